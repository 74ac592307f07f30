# Meshgate: an OpenAI-compatible LLM gateway.
#   docker build -t meshgate .                                   # light image
#   docker build -t meshgate --build-arg EXTRAS=litellm .
#   docker build -t meshgate --build-arg EXTRAS=semantic .      # semantic cache, CPU torch
#   docker build -t meshgate --build-arg EXTRAS=verify .        # verify plugin + its sandbox
#   docker run -p 8080:8080 -v $PWD/proxy.yaml:/etc/meshgate/proxy.yaml meshgate
# The base is pinned to a release; pin its digest too where your registry policy
# asks for it (python:3.11.11-slim-bookworm@sha256:...).
FROM python:3.11.11-slim-bookworm AS build
ARG EXTRAS=""
ARG TORCH="torch==2.13.0"
# PyPI's Linux torch wheel is a CUDA build of several GB: the semantic extra takes
# torch from PyTorch's CPU index, installed first so pip keeps it.
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY plugins ./plugins
# One virtualenv, so that the second install sees the torch of the first.
RUN python -m venv /venv \
 && case ",${EXTRAS}," in *,semantic,*) \
      /venv/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "${TORCH}" ;; esac \
 && /venv/bin/pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"

FROM python:3.11.11-slim-bookworm
ARG EXTRAS=""
# The verify plugin's sandbox: bubblewrap and libseccomp (docs/verify.md says what
# a container runtime must allow for each isolation level).
RUN case ",${EXTRAS}," in *,verify,*) \
      apt-get update \
      && apt-get install -y --no-install-recommends bubblewrap libseccomp2 \
      && rm -rf /var/lib/apt/lists/* ;; esac
COPY --from=build /venv /venv
COPY proxy.yaml /etc/meshgate/proxy.yaml
RUN useradd --system --uid 10001 meshgate
USER 10001
ENV PATH=/venv/bin:$PATH PYTHONUNBUFFERED=1 LITELLM_LOCAL_MODEL_COST_MAP=True \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2).status != 200)"
# hypercorn drains in-flight requests on SIGTERM (server.graceful_timeout_s)
STOPSIGNAL SIGTERM
ENTRYPOINT ["meshgate"]
CMD ["serve", "--config", "/etc/meshgate/proxy.yaml"]

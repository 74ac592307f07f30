# Meshgate: an OpenAI-compatible LLM gateway.
#   docker build -t meshgate .                       # light image
#   docker build -t meshgate --build-arg EXTRAS=litellm .
#   docker build -t meshgate --build-arg EXTRAS=semantic \
#     --build-arg PIP_EXTRA_INDEX_URL=<PyTorch's CPU wheel index> .   # semantic cache, CPU torch
#   docker run -p 8080:8080 -v $PWD/proxy.yaml:/etc/meshgate/proxy.yaml meshgate
FROM python:3.11-slim AS build
ARG EXTRAS=""
ARG TORCH="torch==2.13.0"
# Set only when given (--build-arg); pip reads it from the environment.
ARG PIP_EXTRA_INDEX_URL
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY plugins ./plugins
# One virtualenv, so that the second install sees the torch of the first. The
# semantic extra needs torch: pinned first, or pip would pick a CUDA build.
RUN python -m venv /venv \
 && case ",${EXTRAS}," in *,semantic,*) /venv/bin/pip install --no-cache-dir "${TORCH}" ;; esac \
 && /venv/bin/pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"

FROM python:3.11-slim
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

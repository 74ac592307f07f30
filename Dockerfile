# Meshgate: an OpenAI-compatible LLM gateway.
#   docker build -t meshgate .                       # light image
#   docker build -t meshgate --build-arg EXTRAS=litellm .
#   docker run -p 8080:8080 -v $PWD/proxy.yaml:/etc/meshgate/proxy.yaml meshgate
FROM python:3.11-slim AS build
ARG EXTRAS=""
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY plugins ./plugins
RUN pip install --no-cache-dir --prefix=/install ".${EXTRAS:+[$EXTRAS]}"

FROM python:3.11-slim
COPY --from=build /install /usr/local
COPY proxy.yaml /etc/meshgate/proxy.yaml
RUN useradd --system --uid 10001 meshgate
USER 10001
ENV PYTHONUNBUFFERED=1 LITELLM_LOCAL_MODEL_COST_MAP=True
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2).status != 200)"
# hypercorn drains in-flight requests on SIGTERM (server.graceful_timeout_s)
STOPSIGNAL SIGTERM
ENTRYPOINT ["meshgate"]
CMD ["serve", "--config", "/etc/meshgate/proxy.yaml"]

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY loadtest ./loadtest
COPY policies ./policies
RUN pip install . \
    && mkdir -p /etc/kvgate \
    && cp policies/default.yaml /etc/kvgate/policy.yaml \
    && useradd --system --uid 10001 --no-create-home kvgate

USER kvgate
EXPOSE 8080
# Mount your own policy at /etc/kvgate/policy.yaml; backend URLs must be reachable from the container.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2); sys.exit(0)"
CMD ["kvgate", "run", "-c", "/etc/kvgate/policy.yaml", "--host", "0.0.0.0"]

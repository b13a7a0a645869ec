# kvgate, and the simulated GPU backend (`python -m gateway.sim`), in one image.
#   docker build -t kvgate .
#   docker run -p 8080:8080 -e KVGATE_BACKEND_URL=http://vllm:8000 -e KVGATE_REDIS_URL=redis://redis:6379/0 \
#     -e KVGATE_API_KEY=... -e KVGATE_ADMIN_TOKEN=... kvgate
# The shipped policy (deploy/docker/policy.yaml) lists every variable it reads; mount your own and
# point KVGATE_POLICY at it to serve that instead.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    KVGATE_POLICY=/etc/kvgate/policy.yaml KVGATE_HOST=0.0.0.0 KVGATE_PORT=8080
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY gateway ./gateway
COPY policies ./policies
RUN pip install . \
    && rm -rf /app \
    && useradd --system --uid 10001 --no-create-home kvgate
COPY deploy/docker/policy.yaml /etc/kvgate/policy.yaml
COPY deploy/docker/entrypoint.py /usr/local/lib/kvgate/entrypoint.py
WORKDIR /

USER 10001
# The proxy port (the API, /healthz, /readyz) and the admin listener (/metrics, /admin/state)
EXPOSE 8080 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "/usr/local/lib/kvgate/entrypoint.py", "--healthcheck"]
ENTRYPOINT ["python", "/usr/local/lib/kvgate/entrypoint.py"]

# metergate: the proxy in a slim Python image, built in two stages.
#
#   docker build -t metergate .
#   docker run --rm -p 8080:8080 -e METERGATE_REDIS_URL=redis://redis:6379/0 \
#     -e METERGATE_ADMIN_KEY=... -e OPENAI_API_KEY=... \
#     -v "$PWD/config:/etc/metergate:ro" metergate
#
# The config and the rate cards live in /etc/metergate (metergate.yaml reads
# its cards from ratecards/ beside it); mount your own over it. Secrets come
# from the environment, never from the image.

# One base for both stages: the venv built in the first is copied into the
# second, and its interpreter links only resolve on the same Python install.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the wheel is built from (config/ too: proxy/defaults links to it,
# so the wheel carries the default config); the tests and benchmarks never
# reach the image.
COPY pyproject.toml README.md ./
COPY config/ config/
COPY proxy/ proxy/
COPY pricing/ pricing/

# Every dependency ships manylinux wheels, so no compiler is installed here
# either: a platform without one fails this step instead of silently building.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/wheels . \
    && /opt/venv/bin/pip install --no-cache-dir /tmp/wheels/metergate-*.whl


FROM ${PYTHON_IMAGE}

# The ledger of record defaults to a SQLite file in the working directory, which
# is read-only here: without a database_url the image keeps it in /tmp (lost with
# the container, like the embedded store). Production sets METERGATE_DATABASE_URL.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    METERGATE_DATABASE_URL=sqlite+aiosqlite:////tmp/metergate-ledger.sqlite3

# A fixed uid/gid, so a Kubernetes securityContext (runAsUser) and mounted
# volumes can name it.
RUN groupadd --system --gid 10001 metergate \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin metergate

COPY --from=builder /opt/venv /opt/venv
# Owned by root and read-only to the service: an operator replaces it by mounting.
COPY config/ /etc/metergate/

USER 10001:10001
WORKDIR /etc/metergate

EXPOSE 8080
# slim has no curl: ask with the venv's Python. urlopen raises on a refused
# connection and on any non-2xx answer, so either is an unhealthy exit 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('METERGATE_PORT', '8080') + '/healthz', timeout=4)"]

# metergate drains in-flight calls and closes their holds on SIGTERM.
STOPSIGNAL SIGTERM
ENTRYPOINT ["metergate"]
CMD ["serve", "--config", "/etc/metergate/metergate.yaml", "--host", "0.0.0.0"]

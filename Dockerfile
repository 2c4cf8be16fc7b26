# bgjobs-server on the embedded SQLite default; the database lives in the /data volume.
# It listens on all interfaces, so it needs API tokens: pass BGJOBS_API_TOKENS, or mount a
# file and point BGJOBS_API_TOKENS_FILE at it (see the README's Security section).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/bgjobs
COPY pyproject.toml README.md ./
COPY app ./app
COPY clients/python ./clients/python
RUN pip install --no-cache-dir ./clients/python . \
    && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home bgjobs \
    && mkdir -p /data \
    && chown bgjobs:bgjobs /data

USER 10001:10001
ENV BGJOBS_DATABASE_URL=sqlite+aiosqlite:////data/bgjobs.db
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]

CMD ["bgjobs", "serve", "--host", "0.0.0.0", "--port", "8000"]

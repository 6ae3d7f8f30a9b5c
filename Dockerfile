# The worker image: `docker compose up` (see docker-compose.yml) or
#   docker build -t phoneverify . && docker run -e KAFKA_BOOTSTRAP_SERVERS=... phoneverify
FROM python:3.11-slim AS build
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --disable-pip-version-check --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /tmp/wheels
RUN pip install /tmp/wheels/phoneverify-*.whl && rm -rf /tmp/wheels \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin app \
    && mkdir /data && chown app:app /data

# Settings come from the environment (settings.py); these are the container's defaults.
ENV DATA_DIR=/data \
    WEB_HOST=0.0.0.0 \
    WEB_PORT=6066
VOLUME ["/data"]
EXPOSE 6066
USER app
WORKDIR /home/app
CMD ["phoneverify", "worker"]

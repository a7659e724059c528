# The wallcrawler controller: Python 3.11 daemon + headless Chromium, both from Debian bookworm.
# Build: docker build -t wallcrawler-controller .   (tested here by scripts/test-image.sh with buildah)

# --- build stage: a venv with the package and its runtime dependencies, nothing else --------------
FROM debian:bookworm-slim AS build

# ca-certificates: Debian's pip verifies PyPI against the system bundle.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python3 -m venv /opt/venv

# Dependencies first, from pyproject.toml alone, so a code change reuses this layer.
COPY pyproject.toml ./
RUN mkdir controller && touch controller/__init__.py \
    && /opt/venv/bin/pip install . \
    && /opt/venv/bin/pip uninstall -y wallcrawler-controller

# pip and setuptools are not needed at run time: the final venv leaves them out.
COPY controller/ controller/
RUN /opt/venv/bin/pip install --no-deps . \
    && /opt/venv/bin/pip uninstall -y pip setuptools \
    && /opt/venv/bin/python -c "import controller"

# --- runtime stage ---------------------------------------------------------------------------------
FROM debian:bookworm-slim

# tini is PID 1: it reaps Chromium's orphaned children and forwards SIGTERM to the controller.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates \
        chromium \
        fonts-liberation \
        fonts-noto-color-emoji \
        python3 \
        tini \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && useradd --system --uid 10001 --user-group --create-home --home-dir /home/wallcrawler \
        --shell /usr/sbin/nologin wallcrawler

# Chromium reads managed policies (URL blocklist: file://, the EC2/ECS metadata addresses) from here.
COPY chrome/policies/managed/ /etc/chromium/policies/managed/
COPY chrome/ /app/chrome/
COPY --from=build /opt/venv /opt/venv
COPY entrypoint.sh /app/entrypoint.sh

ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CHROME_CONFIG_DIR=/app/chrome

USER 10001:10001
WORKDIR /home/wallcrawler

EXPOSE 9223 9464
STOPSIGNAL SIGTERM
# Readiness (Chromium usable, proxy listening, first heartbeat written), asked with the image's own
# Python: no curl in the image. urlopen raises on any non-2xx answer, so the exit code says it all.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('METRICS_PORT', '9464'), timeout=4)"]

# -s: stay a subreaper when ECS's own init (initProcessEnabled) is PID 1 and tini is not.
ENTRYPOINT ["/usr/bin/tini", "-s", "--", "/app/entrypoint.sh"]

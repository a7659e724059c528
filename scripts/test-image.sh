#!/usr/bin/env bash
# Build the controller's image and test it end to end, without Docker and without a registry.
#
#   scripts/test-image.sh            base, build, smoke checks, then the end-to-end run
#   scripts/test-image.sh smoke      base, build, smoke checks only
#
# 1. base   debian:bookworm-slim made locally with debootstrap (minbase, slimmed like the official
#           image), cached under $WALLCRAWLER_IMAGE_CACHE and rebuilt when older than a week. It is a
#           CI-only base: it also carries this host's extra CA certificates (/usr/local/share/
#           ca-certificates), because this machine reaches PyPI through a TLS-intercepting proxy. The
#           Dockerfile stays clean; its `ca-certificates` install picks them up.
# 2. build  buildah bud --isolation chroot --pull-never --network host --layers (warm layers reused).
# 3. smoke  the image's user, Python package, Chromium, tini and policy, inside a container.
# 4. e2e    a moto server on loopback with the session item, the container on the host network with
#           loopback-only ports, readiness, the HEALTHCHECK, Playwright through the proxy (a page load,
#           file:// and metadata addresses blocked), SIGTERM, exit code 0, item STOPPED/COMPLETED, and
#           logs that are JSON lines without the token or the key.
#
# Needs root, buildah, podman, runc, debootstrap (Debian packages) and the project's dev venv
# ($PYTHON, default .venv/bin/python: moto, boto3, pyjwt, playwright; Playwright needs no browser
# download here, it only connects over CDP). Podman uses its own storage under the cache directory and
# a containers.conf made here: runc (crun rejects a mixed cgroup v1/v2 layout), cgroupfs, and ulimits
# no higher than this host's hard limits (podman's defaults are higher and fail).
set -euo pipefail

mode=${1:-full}
case $mode in full | smoke) ;; *) echo "usage: $0 [full|smoke]" >&2; exit 2 ;; esac

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${WALLCRAWLER_IMAGE_CACHE:-/var/cache/wallcrawler-image}
python=${PYTHON:-$repo/.venv/bin/python}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
image=localhost/wallcrawler-controller:test
base=docker.io/library/debian:bookworm-slim
# Bump when the base recipe below changes; the cached base is rebuilt.
base_recipe=3

t0=$SECONDS
say() { printf '[test-image %4ds] %s\n' $((SECONDS - t0)) "$*" >&2; }
die() { say "FAIL: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (buildah/podman with runc, debootstrap)"
for tool in buildah podman runc debootstrap; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install buildah podman runc debootstrap)"
done
[ -x "$python" ] || die "$python not found (the project's dev venv; set PYTHON)"

mkdir -p "$cache/conf" "$cache/debs"
# One run at a time per cache: the base, the storage and the layer cache are shared.
exec 9>"$cache/lock"
flock -w 1800 9 || die "another run holds $cache/lock"

# --- podman/buildah configuration, private to this script --------------------------------------
# Within the host's hard limits, and within what buildah's chroot isolation starts from (nproc 32768).
cap() { local hard; hard=$(ulimit -H "$1"); [ "$hard" = unlimited ] || [ "$hard" -gt "$2" ] && hard=$2; echo "$hard"; }
nofile=$(cap -n 65536)
nproc=$(cap -u 32768)
cat >"$cache/conf/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
log_driver = "k8s-file"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
cat >"$cache/conf/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$cache/storage"
runroot = "/run/wallcrawler-image"
EOF
export CONTAINERS_CONF=$cache/conf/containers.conf
export CONTAINERS_STORAGE_CONF=$cache/conf/storage.conf
# Any CA the host trusts beyond Debian's set (see the header); their content is part of the base's key.
host_cas=$(find /usr/local/share/ca-certificates -name '*.crt' -type f 2>/dev/null | sort)

# Containers a killed run left behind (the e2e step names them so).
podman ps -a --format '{{.Names}}' | grep '^wallcrawler-e2e-' | xargs -r podman rm -f -t 0 >/dev/null 2>&1 || true

# --- 1. base -------------------------------------------------------------------------------------
base_key=$({
    echo "$base_recipe $mirror"
    for ca in $host_cas; do cat "$ca"; done
} | sha256sum | cut -c1-16)
base_tar=$cache/bookworm-slim-$base_key.tar
base_tag=localhost/wallcrawler-base:$base_key

make_base_tar() {
    local root=$cache/rootfs
    rm -rf "$root" "$cache"/bookworm-slim-*.tar
    say "base: debootstrap bookworm (minbase) from $mirror"
    debootstrap --variant=minbase --cache-dir="$cache/debs" bookworm "$root" "$mirror" \
        >"$cache/debootstrap.log" 2>&1 || { tail -20 "$cache/debootstrap.log" >&2; die "debootstrap failed"; }

    # What the official slim image does: no docs, man pages or translations, now and in later installs.
    cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/man/*
EOF
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$root"/usr/share/{groff,info,linda,lintian/overrides,man}/*
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
    cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
    echo 'Acquire::GzipIndexes "true";' >"$root/etc/apt/apt.conf.d/docker-gzip-indexes"
    rm -f "$root/etc/apt/sources.list"
    cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    mkdir -p "$root/usr/local/share/ca-certificates"
    for ca in $host_cas; do cp "$ca" "$root/usr/local/share/ca-certificates/"; done
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/*.log "$root"/tmp/* \
        "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old
    : >"$root/etc/machine-id"
    tar --numeric-owner --xattrs -C "$root" -cf "$base_tar.part" .
    mv "$base_tar.part" "$base_tar"
    rm -rf "$root"
}

if [ -f "$base_tar" ] && [ -n "$(find "$base_tar" -mtime +7)" ]; then
    say "base: older than 7 days, rebuilding"
    rm -f "$base_tar"
    podman rmi -f "$base_tag" >/dev/null 2>&1 || true
fi
if ! podman image exists "$base_tag"; then
    [ -f "$base_tar" ] || make_base_tar
    say "base: importing $base_tar"
    podman import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' "$base_tar" "$base_tag" >/dev/null
fi
# The Dockerfile names debian:bookworm-slim; with --pull-never this local image is the one it gets.
podman tag "$base_tag" "$base"
say "base: $base_tag ($(podman image inspect --format '{{.Size}}' "$base_tag" | numfmt --to=iec))"

# --- 2. build ------------------------------------------------------------------------------------
say "build: $image"
build_start=$SECONDS
buildah bud --isolation chroot --pull-never --network host --layers --format docker \
    -t "$image" -f "$repo/Dockerfile" "$repo" >"$cache/build.log" 2>&1 \
    || { tail -40 "$cache/build.log" >&2; die "image build failed (log: $cache/build.log)"; }
say "build: done in $((SECONDS - build_start)) s, $(podman image inspect --format '{{.Size}}' "$image" | numfmt --to=iec)"
# Keep the store from growing with every code change, but keep the build stage's layers (pip's
# download of the dependencies) as a cache: tagged, they are not dangling. All cached: about a second.
buildah bud --isolation chroot --pull-never --network host --layers --format docker --target build \
    -t "$image-build-stage" -f "$repo/Dockerfile" "$repo" >>"$cache/build.log" 2>&1 \
    || die "tagging the build stage failed (log: $cache/build.log)"
podman image prune -f >/dev/null 2>&1 || true

# --- 3. smoke ------------------------------------------------------------------------------------
# --health-interval disable: no systemd here to run the HEALTHCHECK's timer (podman still complains).
chromium_version=$(podman run --rm --network none --health-interval disable --entrypoint sh "$image" -c '
set -e
[ "$(id -u)" = 10001 ] || { echo "runs as uid $(id -u), want the non-root 10001" >&2; exit 1; }
python -c "
import json, os, pathlib, sys
import controller
assert sys.version_info[:2] == (3, 11), sys.version
policy = json.loads(pathlib.Path(\"/etc/chromium/policies/managed/wallcrawler.json\").read_text())
assert \"file://*\" in policy[\"URLBlocklist\"], policy
assert pathlib.Path(os.environ[\"CHROME_CONFIG_DIR\"], \"policies\").is_dir(), os.environ[\"CHROME_CONFIG_DIR\"]
"
chromium --headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage --dump-dom \
    "data:text/html,<title>rendered</title>" 2>/dev/null | grep -q "<title>rendered</title>"
chromium --version
' 2>"$cache/smoke.log") || { grep -v systemd "$cache/smoke.log" >&2; die "smoke checks failed: user, Python 3.11 + controller, managed policy, CHROME_CONFIG_DIR, chromium"; }
# tini as PID 1 with the entrypoint as its child, which execs Python: `python -m controller` with no
# environment must fail on its configuration (exit 2), proving the whole chain runs.
set +e
podman run --rm --network none --health-interval disable "$image" >"$cache/smoke-noenv.log" 2>&1
code=$?
set -e
[ "$code" = 2 ] || { cat "$cache/smoke-noenv.log" >&2; die "the entrypoint without configuration exited $code, want 2"; }
say "smoke: ok ($chromium_version, python 3.11, uid 10001, config error exits 2)"

[ "$mode" = smoke ] && { say "done (smoke) in $((SECONDS - t0)) s"; exit 0; }

# --- 4. end to end -------------------------------------------------------------------------------
say "e2e: starting"
e2e_start=$SECONDS
"$python" - "$image" "$cache/e2e" <<'PY' || die "end-to-end run failed (container log: $cache/e2e/container.log)"
"""The image against moto, driven like production: readiness, Playwright through the proxy, SIGTERM."""

import http.server
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import boto3
import jwt
from moto.server import ThreadedMotoServer
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import sync_playwright

image, outdir = sys.argv[1], Path(sys.argv[2])
outdir.mkdir(parents=True, exist_ok=True)
t0 = time.monotonic()


def say(message: str) -> None:
    print(f"[e2e {time.monotonic() - t0:6.1f}s] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def podman(*args: str, timeout: float = 60, check: bool = True, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and done.returncode != 0:
        raise RuntimeError(f"podman {args[0]} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


class Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>wallcrawler image e2e</title><p id=ok>served on loopback</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


checks: list[str] = []


def check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(what)
    checks.append(what)
    say(f"ok: {what}")


os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
moto.start()
moto_host, moto_port = moto.get_host_and_port()
endpoint = f"http://{moto_host}:{moto_port}"
web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
threading.Thread(target=web.serve_forever, daemon=True).start()
page_url = f"http://127.0.0.1:{web.server_address[1]}/"

session_id = f"sess_image{secrets.token_hex(6)}"
project_id = "proj_image_e2e"
table_name = "wallcrawler-sessions-image-e2e"
signing_key = secrets.token_urlsafe(48)
proxy_port, metrics_port, debug_port = free_port(), free_port(), free_port()
name = f"wallcrawler-e2e-{secrets.token_hex(4)}"

dynamodb = boto3.client("dynamodb", endpoint_url=endpoint, region_name="us-east-1")
dynamodb.create_table(
    TableName=table_name,
    KeySchema=[{"AttributeName": "sessionId", "KeyType": "HASH"}],
    AttributeDefinitions=[{"AttributeName": "sessionId", "AttributeType": "S"}],
    BillingMode="PAY_PER_REQUEST",
)
now = datetime.now(UTC)
dynamodb.put_item(
    TableName=table_name,
    Item={
        "sessionId": {"S": session_id},
        "projectId": {"S": project_id},
        "status": {"S": "RUNNING"},
        "internalStatus": {"S": "PROVISIONING"},
        "createdAt": {"S": now.isoformat().replace("+00:00", "Z")},
        "expiresAt": {"N": str(int(now.timestamp()) + 3600)},
    },
)


def item() -> dict[str, str]:
    raw = dynamodb.get_item(TableName=table_name, Key={"sessionId": {"S": session_id}}, ConsistentRead=True)
    return {k: next(iter(v.values())) for k, v in raw["Item"].items()}


issued = int(time.time())
token = jwt.encode(
    {
        "iss": "wallcrawler",
        "aud": ["cdp-access"],
        "sub": session_id,
        "sessionId": session_id,
        "projectId": project_id,
        "iat": issued,
        "nbf": issued,
        "exp": issued + 600,
        "jti": secrets.token_hex(8),
    },
    signing_key,
    algorithm="HS256",
)

# Values reach podman through its environment (-e NAME), never its command line.
container_env = {
    "SESSION_ID": session_id,
    "PROJECT_ID": project_id,
    "SESSIONS_TABLE_NAME": table_name,
    "WALLCRAWLER_JWT_SIGNING_KEY": signing_key,
    "AWS_ENDPOINT_URL": endpoint,
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    # Host networking: every listener on loopback, on ports nobody else uses.
    "CDP_PROXY_HOST": "127.0.0.1",
    "CDP_PROXY_PORT": str(proxy_port),
    "METRICS_HOST": "127.0.0.1",
    "METRICS_PORT": str(metrics_port),
    "CHROME_DEBUG_PORT": str(debug_port),
    "CDP_HEALTH_CHECK_INTERVAL": "1",
    "STOP_TIMEOUT": "30",
}
env_args = [arg for key in container_env for arg in ("-e", key)]
run_env = {**os.environ, **container_env}

container_log = outdir / "container.log"
try:
    say(f"container {name}: proxy :{proxy_port}, metrics :{metrics_port}, moto :{moto_port}")
    started = time.monotonic()
    # --health-interval disable: no systemd timer here; `podman healthcheck run` still runs the check.
    podman("run", "-d", "--name", name, "--network", "host", "--health-interval", "disable", *env_args,
           image, env=run_env)
    ready = False
    while time.monotonic() - started < 90:
        if http_status(f"http://127.0.0.1:{metrics_port}/readyz") == 200:
            ready = True
            break
        if podman("inspect", "--format", "{{.State.Running}}", name).strip() != "true":
            break
        time.sleep(0.25)
    check(ready, f"readiness (/readyz 200) after {time.monotonic() - started:.1f} s")
    check(http_status(f"http://127.0.0.1:{metrics_port}/livez") == 200, "liveness (/livez 200)")
    health = subprocess.run(["podman", "healthcheck", "run", name], capture_output=True, text=True, timeout=30)
    check(health.returncode == 0, "the image's HEALTHCHECK passes" + (
        "" if health.returncode == 0 else f": {health.stdout.strip()} {health.stderr.strip()[-500:]}"))
    check(podman("exec", name, "cat", "/proc/1/comm").strip() == "tini", "tini is PID 1")
    check(podman("exec", name, "id", "-u").strip() == "10001", "the controller runs as uid 10001")
    check(item()["internalStatus"] == "READY", "the item says READY")
    check(http_status(f"http://127.0.0.1:{proxy_port}/json/version") == 401, "no token: 401")

    with sync_playwright() as pw:
        browser = pw.chromium.connect_over_cdp(f"ws://127.0.0.1:{proxy_port}?signingKey={token}", timeout=30_000)
        context = browser.contexts[0] if browser.contexts else browser.new_context()
        page = context.new_page()
        page.goto(page_url, timeout=30_000)
        check(page.title() == "wallcrawler image e2e", "Playwright loads a page through the proxy")

        def blocked(url: str) -> bool:
            try:
                page.goto(url, timeout=15_000)
            except PlaywrightError as exc:
                return "ERR_BLOCKED_BY_ADMINISTRATOR" in str(exc)
            return False

        # Anything that gets past the policy is answered here by Playwright: no packet ever leaves
        # this machine for a metadata address, whether the policy works or not.
        page.route(lambda url: urllib.parse.urlsplit(url).hostname != "127.0.0.1",
                   lambda route: route.fulfill(status=200, body="not blocked"))
        for url in ("file:///etc/passwd", "http://169.254.169.254/latest/meta-data/",
                    "http://169.254.170.2/v2/credentials/x", "http://[fd00:ec2::254]/latest/meta-data/"):
            check(blocked(url), f"the managed policy blocks {url}")
        check(item()["internalStatus"] == "ACTIVE", "the item says ACTIVE while a client is connected")
        browser.close()

    say("SIGTERM")
    stop_start = time.monotonic()
    podman("kill", "--signal", "TERM", name)
    exit_code = int(podman("wait", name, timeout=60).strip())
    stop_seconds = time.monotonic() - stop_start
    check(exit_code == 0, f"exit code 0 after SIGTERM (got {exit_code}, in {stop_seconds:.1f} s)")
    final = item()
    check(final.get("internalStatus") == "STOPPED" and final.get("status") == "COMPLETED",
          f"the item ends STOPPED/COMPLETED (got {final.get('internalStatus')}/{final.get('status')})")

    logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True, timeout=30)
    container_log.write_text(logs.stdout + logs.stderr)
    lines = [line for line in logs.stdout.splitlines() if line.strip()]
    not_json = []
    for line in lines:
        try:
            if not isinstance(json.loads(line), dict):
                not_json.append(line)
        except ValueError:
            not_json.append(line)
    check(bool(lines) and not not_json, f"all {len(lines)} stdout lines are JSON objects (first bad: {not_json[:1]})")
    check(token not in logs.stdout + logs.stderr and signing_key not in logs.stdout + logs.stderr,
          "neither the token nor the key is in the logs")
    say(f"passed {len(checks)} checks")
except BaseException:
    if not container_log.exists():
        logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True, timeout=30)
        container_log.write_text(logs.stdout + logs.stderr)
    print("--- container log (last 40 lines) ---", file=sys.stderr)
    print("\n".join(container_log.read_text().splitlines()[-40:]), file=sys.stderr)
    raise
finally:
    subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True, timeout=60)
    web.shutdown()
    moto.stop()
PY
say "e2e: ok in $((SECONDS - e2e_start)) s"
say "done in $((SECONDS - t0)) s"

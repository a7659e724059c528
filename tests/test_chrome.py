"""Chromium's lifecycle: switches as data, a scrubbed environment, a usable start, a clean stop."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from controller.chrome import Chrome, DevTools, load_switches, scrubbed_environment
from controller.config import ChromeConfig
from controller.errors import ChromeError
from controller.metrics import Metrics
from tests.chromium_fixtures import (
    chromium_binary,
    eventually,
    group_members,
    listening_addresses,
    process_argv,
    process_environ,
    process_group_of,
    short_tempdir,
)

REPO_CHROME_DIR = Path(__file__).resolve().parent.parent / "chrome"
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-value",
    "AWS_SESSION_TOKEN": "aws-session-token",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/abc",
    "WALLCRAWLER_JWT_SIGNING_KEY": "jwt-signing-key-value-0123456789abcdef",
    "WALLCRAWLER_JWT_SIGNING_SECRET_ARN": "arn:aws:secretsmanager:us-east-1:1:secret:x",
    "ECS_CONTAINER_METADATA_URI_V4": "http://169.254.170.2/v4/abc",
    "SESSION_ID": "sess_abc",
    "DATABASE_PASSWORD": "hunter2",
}


def write_switches(directory: Path, text: str) -> Path:
    """A chrome/ data directory whose switches.txt holds ``text``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "switches.txt").write_text(text)
    return directory


# --- switches as data ---------------------------------------------------------------------------------------


def test_repeated_disable_features_merged(tmp_path: Path) -> None:
    """Repeated --disable-features lines become one switch, values kept in order without duplicates."""
    directory = write_switches(
        tmp_path,
        "--headless=new\n--disable-features=A,B\n--mute-audio\n--disable-features=C,A\n",
    )
    assert load_switches(directory) == ["--headless=new", "--disable-features=A,B,C", "--mute-audio"]


def test_enable_and_disable_features_merged_separately(tmp_path: Path) -> None:
    """--enable-features and --disable-features are each merged into one switch of their own."""
    directory = write_switches(
        tmp_path, "--enable-features=X\n--disable-features=A\n--enable-features=Y\n--disable-features=B\n"
    )
    assert load_switches(directory) == ["--enable-features=X,Y", "--disable-features=A,B"]


def test_comments_and_blank_lines_ignored(tmp_path: Path) -> None:
    """'#' comments and blank lines are not switches."""
    directory = write_switches(tmp_path, "# a comment\n\n   \n--no-first-run\n  # indented comment\n")
    assert load_switches(directory) == ["--no-first-run"]


def test_repository_switches_have_one_disable_features() -> None:
    """The shipped chrome/switches.txt yields exactly one --disable-features holding every listed feature."""
    switches = load_switches(REPO_CHROME_DIR)
    merged = [switch for switch in switches if switch.startswith("--disable-features")]
    assert len(merged) == 1
    features = merged[0].partition("=")[2].split(",")
    assert {"Translate", "DialMediaRouteProvider"} <= set(features)
    assert len(features) == len(set(features))
    assert "--disable-dev-shm-usage" in switches
    assert len(switches) == len(set(switches))


@pytest.mark.parametrize(
    "switch",
    [
        "--remote-debugging-port=9999",
        "--remote-debugging-address=0.0.0.0",
        "--remote-debugging-pipe",
        "--user-data-dir=/tmp/elsewhere",
        "--remote-allow-origins=http://127.0.0.1:9223",  # any value: the switch itself is refused
    ],
)
def test_owned_switches_refused(tmp_path: Path, switch: str) -> None:
    """A data file may not set a switch the controller owns; the error names it and its line."""
    directory = write_switches(tmp_path, f"--headless=new\n{switch}\n")
    with pytest.raises(ChromeError) as error:
        load_switches(directory)
    assert switch.partition("=")[0] in str(error.value)
    assert ":2:" in str(error.value)


@pytest.mark.parametrize("line", ["headless", "-x", "--Bad-Case", "--a b", "--="])
def test_non_switch_lines_refused(tmp_path: Path, line: str) -> None:
    """A line that is not a --switch is refused."""
    with pytest.raises(ChromeError, match="not a --switch"):
        load_switches(write_switches(tmp_path, f"{line}\n"))


def test_missing_switches_file(tmp_path: Path) -> None:
    """A data directory without switches.txt is a ChromeError."""
    with pytest.raises(ChromeError, match=r"switches\.txt"):
        load_switches(tmp_path)


# --- environment --------------------------------------------------------------------------------------------


def test_scrubbed_environment_keeps_only_locale_and_paths(tmp_path: Path) -> None:
    """Chromium's environment keeps PATH, HOME and locale, drops every credential, and gets its TMPDIR."""
    environ = {"PATH": "/usr/bin", "HOME": "/root", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", **SECRETS}
    scrubbed = scrubbed_environment(environ, tmp_path)
    assert scrubbed == {
        "PATH": "/usr/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TMPDIR": str(tmp_path),
    }


# --- a running Chromium -------------------------------------------------------------------------------------


@dataclass
class Launched:
    """A running Chromium and what the tests learned about its processes."""

    chrome: Chrome
    devtools: DevTools
    user_data_dir: Path
    tmp_dir: Path
    pid: int
    pgid: int


def chrome_for(
    workdir: Path, *, binary: Path | None = None, start_timeout: float = 30.0, metrics: Metrics | None = None
) -> Chrome:
    """A Chrome on a free port with its profile and TMPDIR under ``workdir``."""
    (workdir / "tmp").mkdir(exist_ok=True)
    config = ChromeConfig(binary=binary or chromium_binary(), debug_port=0, start_timeout=start_timeout)
    environ = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), **SECRETS}
    return Chrome(
        config, workdir / "profile", workdir / "tmp", metrics or Metrics(), environ=environ, close_timeout=5.0
    )


@pytest.fixture(scope="module", name="launched")
async def launched_fixture() -> AsyncIterator[Launched]:
    """One Chromium, launched with secrets in the controller's environment, for the module."""
    with short_tempdir() as workdir:
        chrome = chrome_for(workdir)
        async with chrome as devtools:
            # A page makes Chromium start its renderer and utility processes too.
            await chrome.call("Target.createTarget", {"url": "data:text/html,<p>hello</p>"})
            pid, pgid = process_group_of(workdir / "profile")
            yield Launched(chrome, devtools, workdir / "profile", workdir / "tmp", pid, pgid)


@pytest.mark.anyio
async def test_ready_means_usable(launched: Launched) -> None:
    """Once entered, Chromium answers CDP on the announced loopback port."""
    version = await launched.chrome.call("Browser.getVersion")
    assert version["product"] == launched.devtools.product
    assert launched.devtools.browser_url.startswith(
        f"ws://127.0.0.1:{launched.devtools.port}/devtools/browser/"
    )


@pytest.mark.anyio
async def test_environment_scrubbed_in_every_process(launched: Launched) -> None:
    """No process of Chromium's group sees AWS_*, ECS_*, WALLCRAWLER_* or other secrets."""
    checked = 0
    for pid in group_members(launched.pgid):
        try:
            environ = process_environ(pid)
        except OSError:
            continue  # a helper that exited meanwhile
        checked += 1
        leaked = [name for name in environ if name.startswith(("AWS_", "ECS_", "WALLCRAWLER_"))]
        assert not leaked, (pid, leaked)
        assert not set(SECRETS) & set(environ)
        assert not any(value in "\0".join(environ.values()) for value in SECRETS.values())
    assert checked >= 2, "expected the browser and its helper processes"
    assert process_environ(launched.pid)["TMPDIR"] == str(launched.tmp_dir)


@pytest.mark.anyio
async def test_own_process_group(launched: Launched) -> None:
    """Chromium leads a process group of its own, apart from the controller's."""
    assert launched.pgid == launched.pid
    assert launched.pgid != os.getpgrp()


@pytest.mark.anyio
async def test_command_line(launched: Launched) -> None:
    """Chromium runs with one merged --disable-features, DevTools on loopback and our profile."""
    argv = process_argv(launched.pid)
    assert sum(arg.startswith("--disable-features") for arg in argv) == 1
    assert "--remote-debugging-address=127.0.0.1" in argv
    assert f"--user-data-dir={launched.user_data_dir}" in argv
    assert not any(arg.startswith("--remote-allow-origins") for arg in argv)


@pytest.mark.anyio
async def test_devtools_listens_on_loopback_only(launched: Launched) -> None:
    """Chromium's DevTools socket is bound to 127.0.0.1, nothing else."""
    assert listening_addresses(launched.devtools.port) == ["127.0.0.1"]


async def group_gone(pgid: int) -> None:
    """Wait until no live process is left in group ``pgid``.

    close() returns once the group has been sent SIGKILL; a helper may still be inside the kernel's exit
    path for a few milliseconds (state R, empty command line) before it is a zombie. Two seconds is far
    more than that and far less than anything a live process could hide in.
    """

    async def empty() -> bool:
        return group_members(pgid) == []

    await eventually(empty, timeout=2.0)


# --- start failures -----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_missing_binary_is_a_chrome_error(tmp_path: Path) -> None:
    """A binary that does not exist fails the start with a ChromeError naming it."""
    with short_tempdir() as workdir:
        chrome = chrome_for(workdir, binary=Path("/nonexistent/chromium"))
        with pytest.raises(ChromeError, match="/nonexistent/chromium"):
            async with chrome:
                pytest.fail("entered a Chromium that does not exist")


@pytest.mark.anyio
async def test_binary_exiting_at_once_is_a_chrome_error(tmp_path: Path) -> None:
    """A browser that exits before DevTools listens fails the start with its exit code."""
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\necho 'cannot open display' >&2\nexit 21\n")
    fake.chmod(0o755)
    with short_tempdir() as workdir, pytest.raises(ChromeError, match="code 21") as error:
        async with chrome_for(workdir, binary=fake):
            pytest.fail("entered a Chromium that exited")
    assert "cannot open display" in str(error.value)


@pytest.mark.anyio
async def test_start_timeout_kills_the_group(tmp_path: Path) -> None:
    """A browser that never becomes usable fails within the start bound and leaves no process behind."""
    marker = tmp_path / "pid"
    fake = tmp_path / "chromium"
    # A child in the group, like Chromium's helpers, that would outlive a signal to the leader alone.
    fake.write_text(f"#!/bin/sh\nsleep 60 &\necho $$ > {marker}\nexec sleep 60\n")
    fake.chmod(0o755)
    started = time.monotonic()
    with short_tempdir() as workdir, pytest.raises(ChromeError, match="within"):
        async with chrome_for(workdir, binary=fake, start_timeout=1.0):
            pytest.fail("entered a Chromium that never listened")
    assert time.monotonic() - started < 10
    pgid = int(marker.read_text())
    await group_gone(pgid)


# --- stopping -----------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_close_leaves_no_process_of_the_group() -> None:
    """Leaving the context stops Chromium over CDP: exit 0, no Singleton files, no process left."""
    with short_tempdir() as workdir:
        chrome = chrome_for(workdir)
        async with chrome:
            await chrome.call("Target.createTarget", {"url": "data:text/html,<p>x</p>"})
            _pid, pgid = process_group_of(workdir / "profile")
            assert len(group_members(pgid)) >= 2
        assert chrome.returncode == 0
        await group_gone(pgid)
        assert not list((workdir / "profile").glob("Singleton*")), "Browser.close was not used"


@pytest.mark.anyio
async def test_close_twice_is_harmless() -> None:
    """close() may be called again (and the context left) after Chromium stopped."""
    with short_tempdir() as workdir:
        chrome = chrome_for(workdir)
        async with chrome:
            await chrome.close()
            assert chrome.returncode == 0
            await chrome.close()
        assert chrome.returncode == 0


@pytest.mark.anyio
async def test_helper_outliving_the_browser_does_not_break_close(tmp_path: Path) -> None:
    """A group member still holding stderr after the browser exits is killed and close() raises nothing."""
    wrapper = tmp_path / "chromium"
    wrapper.write_text(f'#!/bin/sh\n"{chromium_binary()}" "$@"\nsleep 60 &\nexit 0\n')
    wrapper.chmod(0o755)
    with short_tempdir() as workdir:
        chrome = chrome_for(workdir, binary=wrapper)
        async with chrome:
            _pid, pgid = process_group_of(workdir / "profile")
        await group_gone(pgid)


@pytest.mark.anyio
async def test_unexpected_exit_is_noticed() -> None:
    """Chromium killed from outside: wait_exited returns, chrome_up drops to 0, the exit is counted."""
    with short_tempdir() as workdir:
        metrics = Metrics()
        chrome = chrome_for(workdir, metrics=metrics)

        def sample(name: str) -> float | None:
            return metrics.registry.get_sample_value(name)

        async with chrome:
            assert sample("wallcrawler_chrome_up") == 1
            _pid, pgid = process_group_of(workdir / "profile")
            os.killpg(pgid, signal.SIGKILL)
            with anyio.fail_after(10):
                assert await chrome.wait_exited() == -signal.SIGKILL
            assert not chrome.closing
            assert sample("wallcrawler_chrome_up") == 0
            assert sample("wallcrawler_chrome_unexpected_exits_total") == 1
            with pytest.raises(ChromeError):
                await chrome.call("Browser.getVersion")
        await group_gone(pgid)

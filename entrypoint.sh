#!/bin/sh
# The container's command, started by tini (PID 1). It checks nothing: the controller's config parses
# and validates every variable itself. `exec` makes Python tini's direct child, so SIGTERM reaches it.
set -eu
exec python -m controller "$@"

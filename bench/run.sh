#!/usr/bin/env bash
# Benchmarks Portcullis against direct loopback, Squid and tinyproxy, all on loopback, in one run.
#
#   bench/run.sh                 full run (installs squid + tinyproxy with apt-get if missing)
#   bench/run.sh --quick         a few-second smoke run: portcullis and direct only, debug build
#   bench/run.sh --runs 5        medians over 5 interleaved runs (default 3)
#   bench/run.sh --no-peers      skip squid and tinyproxy
#   bench/run.sh --release       with --quick: measure release builds (quick defaults to debug)
#   bench/run.sh --only throttle one section: bulk, setup, scale, throttle, fleet,
#                                fleet-cluster, learn, sni, https, scale-config, way-out or rtt
#                                (all by default; rtt needs root and /dev/net/tun; fleet-cluster
#                                is not in --quick unless named)
#   bench/run.sh --baseline BIN  before/after: BIN is a `portcullis` built from an earlier commit;
#                                bulk, setup and scale also measure it as "portcullis-before"
#                                (same config), in ABBA order against this build: before first
#                                in odd runs, second in even ones (scale: per tunnel count), so
#                                use an even --runs. Throttle ignores it. Works with --no-peers.
#
# Prebuilt binaries instead of cargo: PORTCULLIS_BIN=path LOADGEN_BIN=path bench/run.sh ...
# (with both set nothing is built; with one, cargo still builds and the other comes from target/).
#
# Prints a table and writes bench/results/<time>.jsonl (+ .summary.json). Every process it
# starts is stopped on exit; every load loop is bounded in count and time (see loadgen.rs).
set -euo pipefail
START_DIR=$PWD
cd "$(dirname "$0")/.."
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$START_DIR/$1" ;; esac; }

RUNS=3
QUICK=0
PEERS=1
RELEASE=0
ONLY=all
BASELINE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1; PEERS=0; RUNS=1 ;;
    --runs) RUNS="$2"; shift ;;
    --no-peers) PEERS=0 ;;
    --release) RELEASE=1 ;;
    --only) ONLY="$2"; shift ;;
    --baseline) BASELINE=$(absolute "$2"); shift ;;
    *) echo "unknown argument: $1" >&2; exit 64 ;;
  esac
  shift
done

if [ "$QUICK" = 1 ]; then
  BULK_BYTES=$((64 * 1024 * 1024)); SETUP_SECS=0.5; SETUP_CLIENTS="1 16"; SCALE_TUNNELS="200"
  PROFILE=debug; if [ "$RELEASE" = 1 ]; then PROFILE=release; fi
else
  BULK_BYTES=$((4 * 1024 * 1024 * 1024)); SETUP_SECS=3; SETUP_CLIENTS="1 16 64 256"; SCALE_TUNNELS="1000 5000 9500"
  PROFILE=release
fi
if [ -z "${PORTCULLIS_BIN:-}" ] || [ -z "${LOADGEN_BIN:-}" ]; then
  if [ "$PROFILE" = release ]; then
    cargo build --quiet --release --bin portcullis --example loadgen
  else
    cargo build --quiet --bin portcullis --example loadgen
  fi
fi
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
GATEWAY="$TARGET_DIR/$PROFILE/portcullis"
LOADGEN="$TARGET_DIR/$PROFILE/examples/loadgen"
if [ -n "${PORTCULLIS_BIN:-}" ]; then GATEWAY=$(absolute "$PORTCULLIS_BIN"); fi
if [ -n "${LOADGEN_BIN:-}" ]; then LOADGEN=$(absolute "$LOADGEN_BIN"); fi
for binary in "$GATEWAY" "$LOADGEN" ${BASELINE:+"$BASELINE"}; do
  [ -x "$binary" ] || { echo "missing $binary (build failed?)" >&2; exit 1; }
done

# Two file descriptors per tunnel in the proxy, one per tunnel in the client and the origin.
ulimit -n "$(ulimit -Hn)"

WORK=$(mktemp -d /tmp/portcullis-bench.XXXXXX)
chmod 0777 "$WORK"
mkdir -p bench/results
SUFFIX=""
if [ "$QUICK" = 1 ]; then SUFFIX="-quick"; fi
RESULTS="bench/results/$(date -u +%Y%m%dT%H%M%SZ)$SUFFIX.jsonl"
: > "$RESULTS"

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Listening ports come from below the ephemeral range (32768+), so no client socket can hold
# them, and readiness is read from the socket table: a probe connect to a port nobody listens
# on yet can connect to itself (TCP simultaneous open) and squat the port.
free_port() {
  python3 -c '
import random, socket
for _ in range(100):
    p = random.randint(20000, 32000)
    try:
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", p)); s.close(); print(p); break
    except OSError:
        pass'
}
wait_port() { # PORT [NETNS]: wait up to 10 s for a listener (inside network namespace NETNS)
  local in_ns=()
  if [ -n "${2:-}" ]; then in_ns=(ip netns exec "$2"); fi
  for _ in $(seq 100); do
    if [ -n "$("${in_ns[@]}" ss -Hltn "sport = :$1")" ]; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on port $1${2:+ in $2}" >&2; return 1
}

ORIGIN_PORT=$(free_port); TLS_PORT=$(free_port)
"$LOADGEN" origin --port "$ORIGIN_PORT" --tls-port "$TLS_PORT" --ca "$WORK/ca.der" 2>"$WORK/origin.log" &
ORIGIN_PID=$!
PIDS+=($!)
wait_port "$ORIGIN_PORT"

if [ "$PEERS" = 1 ]; then
  if ! command -v squid >/dev/null || ! command -v tinyproxy >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq squid tinyproxy >/dev/null
    # The install started the packaged services; the benchmark runs its own instances (on
    # ports of its own), so stop what its install started. Nothing else is touched.
    for service in squid tinyproxy; do
      systemctl stop "$service" 2>/dev/null || service "$service" stop 2>/dev/null || true
    done
  fi
  TARGETS="portcullis squid tinyproxy"
else
  TARGETS="portcullis"
fi
if [ -n "$BASELINE" ]; then echo "baseline: $BASELINE as portcullis-before, against $GATEWAY"; fi
# run_order N: the targets of run N. With --baseline, portcullis-before sits next to portcullis,
# first in odd runs and second in even ones (ABBA), so neither build always goes first.
run_order() {
  local t order=""
  for t in $TARGETS; do
    if [ "$t" != portcullis ] || [ -z "$BASELINE" ]; then
      order+=" $t"
    elif [ $(($1 % 2)) = 1 ]; then
      order+=" portcullis-before portcullis"
    else
      order+=" portcullis portcullis-before"
    fi
  done
  echo "$order"
}

# Extra config of the portcullis variants that measure bandwidth schedules (the bench rule's
# category is "other"). A window starting two hours from now is not in force during the run.
LATER=$(( (10#$(date -u +%H) + 2) % 24 ))
LATER=$(printf '%02d:00-%02d:00' "$LATER" $(( (LATER + 1) % 24 )))
all_day() { # NAME RATE [SCOPE] [BRANCHES]
  printf '[[schedule]]\nname = "%s"\ndays = "daily"\nhours = "00:00-00:00"\ntime_zone = "UTC"\nupload = "%s"\ndownload = "%s"\napplies_to = "%s"\ncategories = ["other"]\n%s\n' \
    "$1" "$2" "$2" "${3:-each-branch}" "${4:-}"
}
declare -A EXTRA
EXTRA[portcullis]=""
EXTRA[portcullis-before]=${EXTRA[portcullis]}
EXTRA[portcullis-sched]=$(printf '[[schedule]]\nname = "later"\ndays = "daily"\nhours = "%s"\ntime_zone = "UTC"\nupload = "1 MB/s"\ndownload = "1 MB/s"\ncategories = ["other"]\n' "$LATER")
# A limit on one direction only: the other carries the load generator's reports (uploads are
# counted where they arrive) and must not queue them.
one_way() { # RATE DIRECTION(up|down) [HOURS: all day by default]
  local key=download; [ "$2" = up ] && key=upload
  printf '[[schedule]]\nname = "limit"\ndays = "daily"\nhours = "%s"\ntime_zone = "UTC"\n%s = "%s"\ncategories = ["other"]\n' "${3:-00:00-00:00}" "$key" "$1"
}
# Branch a (127.0.0.2) has its own 2 MB/s; a and b (127.0.0.3) share 5 MB/s.
EXTRA[portcullis-branches]=$(printf '[[branch]]\nname = "a"\nsources = ["127.0.0.2"]\n[[branch]]\nname = "b"\nsources = ["127.0.0.3"]\n'; all_day branch-a "2 MB/s" each-branch 'branches = ["a"]'; all_day shared "5 MB/s" all-branches)

# Squid's peer of a throttled gateway: one aggregate delay pool (it paces what it sends to
# clients: downloads only). Squid refills its buckets once a second, so the bucket must hold a
# second of the rate (a smaller one caps the rate at bucket/s).
declare -A DELAY
delay_pool() { printf 'delay_pools 1\ndelay_class 1 1\ndelay_parameters 1 %s/%s\ndelay_access 1 allow all\n' "$1" "$1"; }
DELAY[squid-1M]=$(delay_pool 1000000)
DELAY[squid-50M]=$(delay_pool 50000000)

# Rules on names (the learn section): the CONNECT names a.bench.example, resolved by an override;
# portcullis-learn also learns it per branch (record: after the first tunnel every one probes the
# learned set and counts).
names_rule() { # LEARN
  printf '[[policy.allow]]\nname = "bench-names"\nhosts = ["*.bench.example"]\nports = [%s]\nprivate_addresses = ["127.0.0.1/32"]\nlearn = "%s"\n[resolver]\nhosts_only = true\n[resolver.hosts]\n"a.bench.example" = "127.0.0.1"\n' "$ORIGIN_PORT" "$1"
}
declare -A TOP HOSTARG ADMIN POLICY
HOSTARG[portcullis-names]="--connect-host a.bench.example"
HOSTARG[portcullis-learn]=${HOSTARG[portcullis-names]}
TOP[portcullis-learn]="state_dir = \"$WORK/state-learn\""

declare -A PORT PID
# start_target NAME: (re)starts a fresh process with an allow-list equivalent to the others':
# CONNECT from 127.0.0.0/8 to 127.0.0.1 on the two origin ports only.
# gateway_config LISTEN CLIENTS PORTS [ADMIN]: a gateway's listener and the one rule every variant
# shares (CONNECT to 127.0.0.1 on PORTS), ending in [limits] for the variant's own lines.
gateway_config() {
  printf '[listen]\nproxy = ["%s"]\nclients = ["%s"]\nadmin = "%s"\n[policy]\nprofiles = []\n%s\n' "$1" "$2" "${4:-off}" "${POLICY[$NAME_FOR_CONFIG]:-}"
  printf '[[policy.allow]]\nname = "bench-origin"\naddresses = ["127.0.0.1/32"]\nports = [%s]\n[limits]\n' "$3"
}
start_target() {
  local name=$1 port
  port=$(free_port)
  case "$name" in
    portcullis*)
      NAME_FOR_CONFIG=$name
      cat > "$WORK/$name.toml" <<EOF
${TOP[$name]:-}
$(gateway_config "127.0.0.1:$port" 127.0.0.0/8 "$ORIGIN_PORT, $TLS_PORT" "${ADMIN[$name]:-off}")
max_connections = 20000
[log]
format = "json"
${EXTRA[$name]}
EOF
      local gateway=$GATEWAY
      if [ "$name" = portcullis-before ]; then gateway=$BASELINE; fi
      "$gateway" serve --config "$WORK/$name.toml" > "$WORK/$name.log" 2>&1 &
      ;;
    squid*)
      cat > "$WORK/$name.conf" <<EOF
http_port 127.0.0.1:$port
acl localnet src 127.0.0.0/8
acl bench_ports port $ORIGIN_PORT $TLS_PORT
acl bench_dst dst 127.0.0.1/32
acl CONNECT method CONNECT
http_access allow CONNECT localnet bench_ports bench_dst
http_access deny all
cache deny all
cache_mem 8 MB
access_log stdio:$WORK/$name-access.log
cache_log $WORK/$name-cache.log
pid_filename $WORK/$name.pid
coredump_dir $WORK
max_filedescriptors 20000
shutdown_lifetime 1 seconds
${DELAY[$name]:-}
EOF
      squid -N -f "$WORK/$name.conf" > "$WORK/$name.out" 2>&1 &
      ;;
    tinyproxy)
      # Syslog, not LogFile: tinyproxy fsyncs its log file after every line (eight per
      # transaction at Info), which measures the disk (about 350 setups per s), not the proxy.
      # Without a syslog daemon its lines are dropped, which can only favour tinyproxy.
      cat > "$WORK/tinyproxy.conf" <<EOF
User nobody
Group nogroup
Port $port
Listen 127.0.0.1
Timeout 600
Allow 127.0.0.0/8
ConnectPort $ORIGIN_PORT
ConnectPort $TLS_PORT
MaxClients 20000
Syslog On
LogLevel Info
EOF
      tinyproxy -d -c "$WORK/tinyproxy.conf" > "$WORK/tinyproxy.out" 2>&1 &
      ;;
  esac
  PID[$name]=$!
  PIDS+=($!)
  PORT[$name]=$port
  wait_port "$port" || { tail -n 20 "$WORK/$name".{log,out} >&2 2>/dev/null; return 1; }
}
stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
stop_target() { stop_pid "${PID[$1]}"; }

# args_for NAME RUN: loadgen target arguments
args_for() {
  if [ "$1" = direct ]; then
    echo --name direct --origin-port "$ORIGIN_PORT" --origin-pid "$ORIGIN_PID" --tls-port "$TLS_PORT" --run "$2"
  else
    echo --name "$1" --proxy "127.0.0.1:${PORT[$1]}" --proxy-pid "${PID[$1]}" --origin-port "$ORIGIN_PORT" --origin-pid "$ORIGIN_PID" --tls-port "$TLS_PORT" --run "$2" ${HOSTARG[$1]:-}
  fi
}

for t in $(run_order 1); do start_target "$t"; done

section() { [ "$ONLY" = all ] || [ "$ONLY" = "$1" ]; }
# abba N A B: "A B" in odd runs, "B A" in even ones, so neither variant always goes first (a
# fixed order biased the earlier runs).
abba() { if [ $(($1 % 2)) = 1 ]; then echo "$2 $3"; else echo "$3 $2"; fi; }

section bulk && echo "bulk: $((BULK_BYTES / 1024 / 1024)) MiB per transfer, $RUNS interleaved run(s)"
section bulk && for run in $(seq "$RUNS"); do
  for t in direct $(run_order "$run"); do
    # shellcheck disable=SC2046
    {
      "$LOADGEN" bulk $(args_for "$t" "$run") --bytes "$BULK_BYTES" --direction down
      "$LOADGEN" bulk $(args_for "$t" "$run") --bytes "$BULK_BYTES" --direction up
      "$LOADGEN" bulk $(args_for "$t" "$run") --bytes "$BULK_BYTES" --streams 8
      "$LOADGEN" bulk $(args_for "$t" "$run") --bytes "$BULK_BYTES" --streams 64
      "$LOADGEN" bulk $(args_for "$t" "$run") --bytes "$BULK_BYTES" --tls --ca "$WORK/ca.der"
      "$LOADGEN" bulk $(args_for "$t" "$run") --bytes "$BULK_BYTES" --tls --ca "$WORK/ca.der" --direction up
    } >> "$RESULTS"
  done
done

section setup && echo "setup: clients $SETUP_CLIENTS, ${SETUP_SECS}s each"
section setup && for run in $(seq "$RUNS"); do
  for c in $SETUP_CLIENTS; do
    for t in direct $(run_order "$run"); do
      # shellcheck disable=SC2046
      "$LOADGEN" setup $(args_for "$t" "$run") --clients "$c" --seconds "$SETUP_SECS" >> "$RESULTS"
    done
  done
done

section scale && echo "scale: $SCALE_TUNNELS idle tunnels, fresh process each"
section scale && step=0 && for n in $SCALE_TUNNELS; do
  step=$((step + 1))
  for t in $(run_order "$step"); do
    stop_target "$t"; start_target "$t"
    # shellcheck disable=SC2046
    "$LOADGEN" scale $(args_for "$t" 1) --tunnels "$n" >> "$RESULTS"
  done
done

# Bandwidth schedules: accuracy against the limit and fairness (Jain's index) over 1-32 tunnels
# at 1 MB/s and 50 MB/s both ways; a branch budget and a shared one at once; and what a
# schedule that is configured but not in force costs an unthrottled tunnel.
if [ "$QUICK" = 1 ]; then
  THROTTLE_SECS=2; THROTTLE_CASES="50M:50000000:1"; SCHED_RUNS=1
else
  THROTTLE_SECS=10; THROTTLE_CASES="1M:1000000:1 1M:1000000:4 1M:1000000:32 50M:50000000:1 50M:50000000:4 50M:50000000:32"; SCHED_RUNS=$((RUNS * 3 + 1))
fi
if section throttle; then
echo "throttle: ${THROTTLE_SECS}s per case"
THROTTLED="portcullis"
if [ "$PEERS" = 1 ]; then THROTTLED="portcullis squid"; fi
for case in $THROTTLE_CASES; do
  IFS=: read -r tag limit streams <<< "$case"
  EXTRA[portcullis-$tag]=""
  for proxy in $THROTTLED; do
    for dir in down up; do
      # A fresh process per direction: no queue left over from the previous measurement.
      [ "$proxy" = portcullis ] && EXTRA[portcullis-$tag]=$(one_way "$limit B/s" "$dir")
      start_target "$proxy-$tag"
      # shellcheck disable=SC2046
      "$LOADGEN" throttle $(args_for "$proxy-$tag" 1 | sed "s/--name [^ ]*/--name $proxy/") --streams "$streams" --direction "$dir" \
        --seconds "$THROTTLE_SECS" --limit "$limit" --label "$tag-" >> "$RESULTS"
      stop_target "$proxy-$tag"
    done
  done
done
if [ "$QUICK" = 0 ]; then
  for dir in down up; do
    start_target portcullis-branches
    # shellcheck disable=SC2046
    "$LOADGEN" throttle $(args_for portcullis-branches 1) --streams 4 --direction "$dir" \
      --seconds "$THROTTLE_SECS" --limit 5000000 --sources 127.0.0.2,127.0.0.3 --label "br-" >> "$RESULTS"
    stop_target portcullis-branches
  done
fi
echo "schedules configured, none in force: bulk against plain portcullis, $SCHED_RUNS interleaved runs"
start_target portcullis-sched
for run in $(seq "$SCHED_RUNS"); do
  order=$(abba "$run" portcullis portcullis-sched)
  for t in $order; do
    # shellcheck disable=SC2046
    {
      "$LOADGEN" bulk $(args_for "$t" "$((run + 100))") --bytes "$BULK_BYTES" --direction down
      "$LOADGEN" bulk $(args_for "$t" "$((run + 100))") --bytes "$BULK_BYTES" --streams 8
    } | sed 's/"scenario":"bulk"/"scenario":"sched"/' >> "$RESULTS"
  done
done
stop_target portcullis-sched
fi

# Fleet mode configured (a redis-server of our own, limits configured but not in force) against
# plain portcullis: bulk in ABBA order. Skipped without redis-server (apt-get install redis-server).
if section fleet && command -v redis-server >/dev/null; then
  if [ "$QUICK" = 1 ]; then FLEET_RUNS=1; else FLEET_RUNS=$((RUNS * 3 + 1)); fi
  REDIS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no > "$WORK/redis.log" 2>&1 &
  PIDS+=($!); REDIS_PID=$!
  wait_port "$REDIS_PORT"
  EXTRA[portcullis-fleet]=$(printf '%s\n[fleet]\nredis = "redis://127.0.0.1:%s/0"\nname = "bench"\n' "${EXTRA[portcullis-sched]}" "$REDIS_PORT")
  echo "fleet mode configured, limits not in force: bulk against plain portcullis, $FLEET_RUNS interleaved runs"
  start_target portcullis-fleet
  for run in $(seq "$FLEET_RUNS"); do
    order=$(abba "$run" portcullis portcullis-fleet)
    for t in $order; do
      # shellcheck disable=SC2046
      {
        "$LOADGEN" bulk $(args_for "$t" "$((run + 200))") --bytes "$BULK_BYTES" --direction down
        "$LOADGEN" bulk $(args_for "$t" "$((run + 200))") --bytes "$BULK_BYTES" --streams 8
      } | sed 's/"scenario":"bulk"/"scenario":"fleet"/' >> "$RESULTS"
    done
  done
  redis_commands() { redis-cli -p "$REDIS_PORT" info stats | sed -n 's/^total_commands_processed:\([0-9]*\).*/\1/p'; }
  # What the idle fleet costs Redis: commands in 5 s (one PING per refresh: no budget in force).
  before=$(redis_commands); sleep 5; after=$(redis_commands)
  echo "fleet: Redis commands per second from one idle replica: $(( (after - before - 1) / 5 ))"
  stop_target portcullis-fleet
  if [ "$QUICK" = 0 ]; then
    # Redis commands per second against the budgets with traffic: 8 branches with a 1 MB/s
    # download budget each, one tunnel in K of them (every refresh: one call per active budget).
    branches=""
    for i in $(seq 2 9); do branches+=$(printf '\n[[branch]]\nname = "b%s"\nsources = ["127.0.0.%s"]' "$i" "$i"); done
    EXTRA[portcullis-fleet-budgets]=$(printf '%s\n%s\n[fleet]\nredis = "redis://127.0.0.1:%s/0"\nname = "bench"\n' "$branches" "$(one_way "1000000 B/s" down)" "$REDIS_PORT")
    start_target portcullis-fleet-budgets
    for k in 1 2 4 8; do
      sources=$(seq 2 $((k + 1)) | sed 's/^/127.0.0./' | paste -sd, -)
      before=$(redis_commands); started=$(date +%s.%N)
      # shellcheck disable=SC2046
      "$LOADGEN" throttle $(args_for portcullis-fleet-budgets 1) --streams "$k" --direction down \
        --seconds 4 --limit $((k * 1000000)) --sources "$sources" --label "fleet$k-" >> "$RESULTS"
      after=$(redis_commands)
      echo "fleet: $k budget(s) with traffic: $(python3 -c "print(round(($after - $before - 1) / ($(date +%s.%N) - $started)))") Redis commands per second (a script call counts with the commands it runs)"
    done
    stop_target portcullis-fleet-budgets
  fi
  kill "$REDIS_PID" 2>/dev/null || true
fi

# Redis commands per second on each primary against the number of busy budgets: one Redis
# against a Redis Cluster of three primaries (redis-servers of the run's own), one replica with
# 192 branches, each with a 250 kB/s download budget, and a tunnel in K of them. Not in --quick
# (unless asked for with --only fleet-cluster); skipped without redis-server and redis-cli.
if section fleet-cluster && { [ "$QUICK" = 0 ] || [ "$ONLY" = fleet-cluster ]; } \
  && command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
  SINGLE_PORT=$(free_port)
  redis-server --port "$SINGLE_PORT" --bind 127.0.0.1 --save "" --appendonly no > "$WORK/redis-single.log" 2>&1 &
  PIDS+=($!)
  CLUSTER_PORTS=()
  for _ in 1 2 3; do
    node_port=$(free_port)
    # The bus port named too: port + 10000 may be taken.
    redis-server --port "$node_port" --cluster-port "$(free_port)" --cluster-enabled yes \
      --cluster-config-file "$WORK/nodes-$node_port.conf" --dir "$WORK" --bind 127.0.0.1 \
      --save "" --appendonly no > "$WORK/redis-$node_port.log" 2>&1 &
    PIDS+=($!)
    CLUSTER_PORTS+=("$node_port")
  done
  for node_port in "$SINGLE_PORT" "${CLUSTER_PORTS[@]}"; do wait_port "$node_port"; done
  # shellcheck disable=SC2046
  redis-cli --cluster create $(printf '127.0.0.1:%s ' "${CLUSTER_PORTS[@]}") --cluster-replicas 0 \
    --cluster-yes > "$WORK/cluster-create.log" 2>&1
  for _ in $(seq 100); do
    ready=1
    for node_port in "${CLUSTER_PORTS[@]}"; do
      redis-cli -p "$node_port" cluster info | grep -q cluster_state:ok || ready=0
    done
    if [ "$ready" = 1 ]; then break; fi
    sleep 0.1
  done
  BUDGETS=192
  branches=""
  for i in $(seq 2 $((BUDGETS + 1))); do branches+=$(printf '\n[[branch]]\nname = "b%s"\nsources = ["127.0.0.%s"]' "$i" "$i"); done
  seeds=$(printf '127.0.0.1:%s,' "${CLUSTER_PORTS[@]}")
  EXTRA[portcullis-redis-single]=$(printf '%s\n%s\n[fleet]\nredis = "redis://127.0.0.1:%s/0"\nname = "bench"\n' "$branches" "$(one_way "250000 B/s" down)" "$SINGLE_PORT")
  EXTRA[portcullis-redis-cluster]=$(printf '%s\n%s\n[fleet]\nredis = "redis+cluster://%s"\nname = "bench"\n' "$branches" "$(one_way "250000 B/s" down)" "${seeds%,}")
  commands_on() { redis-cli -p "$1" info stats | sed -n 's/^total_commands_processed:\([0-9]*\).*/\1/p'; }
  echo "fleet-cluster: Redis commands per second on each primary (INFO stats, a script call counts with the commands it runs), one replica, K of $BUDGETS budgets busy"
  for mode in single cluster; do
    target=portcullis-redis-$mode
    if [ "$mode" = single ]; then ports=("$SINGLE_PORT"); else ports=("${CLUSTER_PORTS[@]}"); fi
    start_target "$target"
    for k in 12 48 96 192; do
      sources=$(seq 2 $((k + 1)) | sed 's/^/127.0.0./' | paste -sd, -)
      before=()
      for node_port in "${ports[@]}"; do before+=("$(commands_on "$node_port")"); done
      started=$(date +%s.%N)
      # shellcheck disable=SC2046
      "$LOADGEN" throttle $(args_for "$target" 1) --streams "$k" --direction down \
        --seconds 4 --limit $((k * 250000)) --sources "$sources" --label "redis-$mode$k-" >> "$RESULTS"
      elapsed=$(python3 -c "print($(date +%s.%N) - $started)")
      rates=()
      for i in "${!ports[@]}"; do
        after=$(commands_on "${ports[$i]}")
        # Less the INFO call that read the count before.
        rates+=("$(python3 -c "print(round(($after - ${before[$i]} - 1) / $elapsed))")")
      done
      total=$(python3 -c "print(sum([${rates[*]/%/,}]))")
      echo "fleet-cluster: $mode, $k busy budget(s): ${rates[*]} per primary (total $total, busiest $(printf '%s\n' "${rates[@]}" | sort -n | tail -1))"
    done
    stop_target "$target"
  done
fi

# The SNI check inside TLS: one tunnel downloading inside TLS through a rule that checks the
# ClientHello's server name (the CONNECT names origin.bench.test, the name the TLS client sends)
# against plain portcullis (an IP-literal rule, no check), ABBA over interleaved runs.
if section sni; then
  if [ "$QUICK" = 1 ]; then SNI_RUNS=2; else SNI_RUNS=$((RUNS * 2)); fi
  EXTRA[portcullis-sni]=$(printf '[[policy.allow]]\nname = "bench-sni"\nhosts = ["origin.bench.test"]\nports = [%s]\nprivate_addresses = ["127.0.0.1/32"]\nsni = "match"\n[resolver]\nhosts_only = true\n[resolver.hosts]\n"origin.bench.test" = "127.0.0.1"\n' "$TLS_PORT")
  HOSTARG[portcullis-sni]="--connect-host origin.bench.test"
  echo "sni: one tunnel down inside TLS, SNI checked against not, $SNI_RUNS interleaved runs"
  start_target portcullis-sni
  for run in $(seq "$SNI_RUNS"); do
    order=$(abba "$run" portcullis portcullis-sni)
    for t in $order; do
      # shellcheck disable=SC2046
      "$LOADGEN" bulk $(args_for "$t" "$((run + 400))") --bytes "$BULK_BYTES" --tls --ca "$WORK/ca.der" \
        | sed 's/"scenario":"bulk"/"scenario":"sni"/' >> "$RESULTS"
    done
  done
  stop_target portcullis-sni
fi

# The HTTPS listener with client certificates (a branch identified by its certificate): idle
# memory per tunnel, the setup rate (each a TLS handshake with a client certificate) and one
# tunnel's throughput, against the plain listener; fresh processes for the idle tunnels.
if section https; then
  "$LOADGEN" pki "$WORK/pki"
  HTTPS_PORT=$(free_port)
  EXTRA[portcullis-https]=$(printf '[[listen.tls_proxy]]\naddress = "127.0.0.1:%s"\nclient_certificates = "required"\n[tls]\ncertificate = "%s/pki/gateway.pem"\nkey = "%s/pki/gateway.key"\nclient_ca = "%s/pki/ca.pem"\n[[branch]]\nname = "bench"\nclient_certificates = ["branch.bench.test"]\n' "$HTTPS_PORT" "$WORK" "$WORK" "$WORK")
  HOSTARG[portcullis-https]="--proxy-tls $WORK/pki"
  https_start() { start_target "$1"; [ "$1" = portcullis-https ] && PORT[portcullis-https]=$HTTPS_PORT; return 0; }
  if [ "$QUICK" = 1 ]; then HTTPS_RUNS=2; HTTPS_TUNNELS="200"; else HTTPS_RUNS=$((RUNS * 2)); HTTPS_TUNNELS="1000 5000 9500"; fi
  echo "https: client-certificate listener against plain, $HTTPS_RUNS interleaved runs; idle tunnels $HTTPS_TUNNELS"
  https_start portcullis-https
  for run in $(seq "$HTTPS_RUNS"); do
    order=$(abba "$run" portcullis portcullis-https)
    for t in $order; do
      # shellcheck disable=SC2046
      {
        "$LOADGEN" bulk $(args_for "$t" "$((run + 500))") --bytes "$BULK_BYTES" --direction down
        "$LOADGEN" bulk $(args_for "$t" "$((run + 500))") --bytes "$BULK_BYTES" --direction up
        "$LOADGEN" setup $(args_for "$t" "$((run + 500))") --clients 1 --seconds "$SETUP_SECS"
        "$LOADGEN" setup $(args_for "$t" "$((run + 500))") --clients 16 --seconds "$SETUP_SECS"
      } | sed 's/"scenario":"bulk"/"scenario":"https-bulk"/; s/"scenario":"setup"/"scenario":"https-setup"/' >> "$RESULTS"
    done
  done
  step=0
  for n in $HTTPS_TUNNELS; do
    step=$((step + 1))
    order=$(abba "$step" portcullis portcullis-https)
    for t in $order; do
      stop_target "$t"; https_start "$t"
      # shellcheck disable=SC2046
      "$LOADGEN" scale $(args_for "$t" 1) --tunnels "$n" | sed 's/"scenario":"scale"/"scenario":"https-scale"/' >> "$RESULTS"
    done
  done
  stop_target portcullis-https
fi

# Learned destinations: the setup rate with a rule that learns against the same rule without,
# both on names (CONNECT a.bench.example), ABBA over interleaved runs.
if section learn; then
  if [ "$QUICK" = 1 ]; then LEARN_RUNS=2; LEARN_CLIENTS="1 16"; else LEARN_RUNS=$((RUNS * 2)); LEARN_CLIENTS="1 16 64"; fi
  EXTRA[portcullis-names]=$(names_rule off)
  EXTRA[portcullis-learn]=$(names_rule record)
  echo "learn: setup rate with learn = record against learn = off, clients $LEARN_CLIENTS, $LEARN_RUNS interleaved runs"
  start_target portcullis-names
  start_target portcullis-learn
  for run in $(seq "$LEARN_RUNS"); do
    order=$(abba "$run" portcullis-names portcullis-learn)
    for c in $LEARN_CLIENTS; do
      for t in $order; do
        # shellcheck disable=SC2046
        "$LOADGEN" setup $(args_for "$t" "$((run + 300))") --clients "$c" --seconds "$SETUP_SECS" \
          | sed 's/"scenario":"setup"/"scenario":"learn"/' >> "$RESULTS"
      done
    done
  done
  stop_target portcullis-names
  stop_target portcullis-learn
fi

# The size of the config: N branches, each with a /24 of its own and a pinned storage rule of its
# own, the client (127.0.0.1) being the last branch, on the bench rule. The setup rate, the
# gateway's CPU per setup, its memory at rest, the time to start listening and to check-config.
# Config size: N branches, each with its own allow rule, identified by source network, by
# credentials or by client certificate name; the client is the last branch. Per N: memory at
# rest, start, check-config, reload and /metrics times; setups at each client count; and setups
# while reloads (then scrapes) run back to back, against the same setups without them.
if section scale-config; then
  if [ "$QUICK" = 1 ]; then SC_BRANCHES="1 200"; SC_CLIENTS="1"; else SC_BRANCHES="1 2000 10000"; SC_CLIENTS="1 64"; fi
  SC_MODES="source credentials certificate"
  echo "scale-config: branches $SC_BRANCHES, identified by $SC_MODES, clients $SC_CLIENTS"
  [ -f "$WORK/pki/ca.pem" ] || "$LOADGEN" pki "$WORK/pki"
  SC_HASH=$(printf 'bench-secret' | "$GATEWAY" hash-password)
  branches_config() { # N MODE
    python3 - "$1" "$2" "$SC_HASH" "$WORK" <<'PY'
import sys
n, mode, password_hash, work = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
def identity(i, last):
    if mode == "source":
        return f'sources = ["{"127.0.0.0/24" if last else f"127.{1 + i // 256}.{i % 256}.0/24"}"]'
    if mode == "credentials":
        return f'credentials = [{{ user = "{"last" if last else f"b{i}"}", password_hash = "{password_hash}" }}]'
    return f'client_certificates = ["{"branch.bench.test" if last else f"b{i}.bench.test"}"]'
for i in range(n - 1):
    print(f'[[policy.allow]]\nname = "b{i}-storage"\ncategory = "storage"\nhosts = ["acct{i}.file.core.windows.net"]\n'
          f'[[branch]]\nname = "b{i}"\n{identity(i, False)}\nallow = ["b{i}-storage"]')
print(f'[[branch]]\nname = "last"\n{identity(0, True)}\nallow = ["bench-origin"]')
if mode == "certificate":
    print(f'[tls]\ncertificate = "{work}/pki/gateway.pem"\nkey = "{work}/pki/gateway.key"\nclient_ca = "{work}/pki/ca.pem"')
PY
  }
  SC_HTTPS_PORT=$(free_port)
  # ms COMMAND...: wall time of a command in milliseconds
  ms() { local t; t=$(date +%s%N); "$@" > /dev/null; echo $(( ($(date +%s%N) - t) / 1000000 )); }
  median3() { printf '%s\n' "$@" | sort -n | sed -n 2p; }
  # under_load N LABEL COMMAND...: setups from the last client count while COMMAND runs every
  # half second (at most 1,000 times, and stopped when the setups end).
  under_load() {
    local n=$1 label=$2 c loop; shift 2
    c=${SC_CLIENTS##* }
    ( for _ in $(seq 1000); do "$@" > /dev/null 2>&1 || true; sleep 0.5; done ) &
    loop=$!
    # shellcheck disable=SC2046
    "$LOADGEN" setup $(args_for "$t" "$run" | sed "s/--name [^ ]*/--name portcullis/") --clients "$c" --seconds "$SETUP_SECS" \
      | sed "s/\"scenario\":\"setup\"/\"scenario\":\"scale-config\"/; s/\"variant\":\"clients-/\"variant\":\"branches-$n-$label-clients-/" >> "$RESULTS"
    kill "$loop" 2>/dev/null || true; wait "$loop" 2>/dev/null || true
  }
  for run in $(seq "$RUNS"); do
    # Odd runs go from the smallest config up, even runs down (a fixed order biased the first).
    order=$SC_BRANCHES
    if [ $((run % 2)) = 0 ]; then order=$(printf '%s\n' $SC_BRANCHES | tac | tr '\n' ' '); fi
    for n in $order; do
      for mode in $SC_MODES; do
        t=portcullis-branches-$n-$mode
        EXTRA[$t]=$(branches_config "$n" "$mode")
        case "$mode" in
          credentials) HOSTARG[$t]="--proxy-auth last:bench-secret" ;;
          certificate)
            TOP[$t]=$(printf '[[listen.tls_proxy]]\naddress = "127.0.0.1:%s"\nclient_certificates = "required"\n' "$SC_HTTPS_PORT")
            HOSTARG[$t]="--proxy-tls $WORK/pki" ;;
          source) ADMIN[$t]="127.0.0.1:$(free_port)" ;;
        esac
        started=$(date +%s%N)
        start_target "$t"
        start_ms=$(( ($(date +%s%N) - started) / 1000000 ))
        if [ "$mode" = certificate ]; then PORT[$t]=$SC_HTTPS_PORT; fi
        rss_kib=$(awk '/^VmRSS:/ {print $2}' "/proc/${PID[$t]}/status")
        for c in $SC_CLIENTS; do
          # shellcheck disable=SC2046
          "$LOADGEN" setup $(args_for "$t" "$run" | sed "s/--name [^ ]*/--name portcullis/") --clients "$c" --seconds "$SETUP_SECS" \
            | sed "s/\"scenario\":\"setup\"/\"scenario\":\"scale-config\"/; s/\"variant\":\"clients-/\"variant\":\"branches-$n-$mode-clients-/" >> "$RESULTS"
        done
        if [ "$mode" = source ]; then
          check_ms=$(median3 "$(ms "$GATEWAY" check-config "$WORK/$t.toml")" "$(ms "$GATEWAY" check-config "$WORK/$t.toml")" "$(ms "$GATEWAY" check-config "$WORK/$t.toml")")
          admin="http://${ADMIN[$t]}"
          reload() { curl -sf -X POST "$admin/reload"; }
          scrape() { curl -sf "$admin/metrics"; }
          reload_ms=$(median3 "$(ms reload)" "$(ms reload)" "$(ms reload)")
          metrics_ms=$(median3 "$(ms scrape)" "$(ms scrape)" "$(ms scrape)")
          metrics_bytes=$(scrape | wc -c)
          under_load "$n" reloading reload
          # At rest: one more reload, waited for (one the loop started may still be running).
          reload > /dev/null; sleep 1
          rss_after_kib=$(awk '/^VmRSS:/ {print $2}' "/proc/${PID[$t]}/status")
          under_load "$n" scraping scrape
          printf '{"scenario":"scale-config","target":"portcullis","variant":"branches-%s","run":%s,"rss_mib":%s,"rss_after_reloads_mib":%s,"start_ms":%s,"check_config_ms":%s,"reload_ms":%s,"metrics_ms":%s,"metrics_mib":%s}\n' \
            "$n" "$run" "$(python3 -c "print($rss_kib / 1024)")" "$(python3 -c "print($rss_after_kib / 1024)")" "$start_ms" "$check_ms" \
            "$reload_ms" "$metrics_ms" "$(python3 -c "print($metrics_bytes / 1048576)")" >> "$RESULTS"
        fi
        stop_target "$t"
      done
    done
  done
fi

# The way out: the setup rate with an egress (a source address, IPv4 only) against none, ABBA
# (no regression for the direct path); and Squid as a parent behind the gateway against Squid
# alone (setups and one tunnel's throughput: what the gateway adds on top of a parent).
if section way-out; then
  if [ "$QUICK" = 1 ]; then WAY_RUNS=2; else WAY_RUNS=$((RUNS * 2)); fi
  EXTRA[portcullis-egress]=$(printf '[egress.out]\nsource_ipv4 = "127.0.0.1"\nfamilies = ["ipv4"]\n')
  POLICY[portcullis-egress]='egress = "out"'
  echo "way-out: egress against none, $WAY_RUNS interleaved runs"
  start_target portcullis-egress
  for run in $(seq "$WAY_RUNS"); do
    for t in $(abba "$run" portcullis portcullis-egress); do
      for c in 1 16; do
        # shellcheck disable=SC2046
        "$LOADGEN" setup $(args_for "$t" "$((run + 600))") --clients "$c" --seconds "$SETUP_SECS" \
          | sed 's/"scenario":"setup"/"scenario":"way-out-setup"/' >> "$RESULTS"
      done
    done
  done
  stop_target portcullis-egress
  if command -v squid >/dev/null; then
    start_target squid-parent
    EXTRA[portcullis-parent]=$(printf '[[parent]]\nname = "squid"\naddress = "127.0.0.1:%s"\n[egress.parent]\nvia = ["squid"]\n' "${PORT[squid-parent]}")
    POLICY[portcullis-parent]='egress = "parent"'
    start_target portcullis-parent
    echo "way-out: portcullis with squid as its parent against squid alone, $WAY_RUNS interleaved runs"
    for run in $(seq "$WAY_RUNS"); do
      for t in $(abba "$run" squid-parent portcullis-parent); do
        # shellcheck disable=SC2046
        {
          "$LOADGEN" setup $(args_for "$t" "$((run + 700))") --clients 1 --seconds "$SETUP_SECS"
          "$LOADGEN" setup $(args_for "$t" "$((run + 700))") --clients 16 --seconds "$SETUP_SECS"
          "$LOADGEN" bulk $(args_for "$t" "$((run + 700))") --bytes "$BULK_BYTES" --direction down
        } | sed 's/"scenario":"setup"/"scenario":"parent-setup"/; s/"scenario":"bulk"/"scenario":"parent-bulk"/' >> "$RESULTS"
      done
    done
    stop_target portcullis-parent
    stop_target squid-parent
  fi
fi

# Throttled tunnels over a long round trip (network namespaces of the run's own).
if section rtt; then . bench/rtt.sh; fi

echo
"$LOADGEN" report "$RESULTS"
echo "results: $RESULTS"

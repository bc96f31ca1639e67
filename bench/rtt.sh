# Sourced by bench/run.sh (--only rtt, or a full run): throttled tunnels over a long round trip,
# which limits.throttle_queue must allow for. The client runs in a network namespace of its own,
# the gateway and the origin in a second one, joined by bench/delay_line.py (TUN devices and a
# fixed delay each way: this kernel has no netem). Each round trip, direction and
# throttle_queue gets a fresh gateway and one tunnel, measured in two ways:
#   fresh: limited to 1 MB/s from the start (the default throttle_queue only);
#   free-then: running free for 3 s, so the kernel grows its buffers, then a reload (SIGHUP)
#     moves the limit's window to now, which is when the queue bound shrinks them.
# loadgen reports the rate reached against the limit, after a warm-up that covers slow start.
# Needs root, /dev/net/tun and ip(8); skipped without them.

if [ "$(id -u)" != 0 ] || [ ! -c /dev/net/tun ] || ! command -v ip >/dev/null; then
  echo "rtt: skipped (needs root, /dev/net/tun and ip)"
  return 0
fi
if [ "$QUICK" = 1 ]; then
  RTT_SECS=3; RTT_CASES="200"; RTT_QUEUES="100ms 300ms"
else
  RTT_SECS=10; RTT_CASES="100 200 400"; RTT_QUEUES="100ms 300ms 500ms"
fi
RTT_LIMIT=1000000
echo "rtt: one tunnel at $((RTT_LIMIT / 1000)) kB/s, round trips $RTT_CASES ms, throttle_queue $RTT_QUEUES, ${RTT_SECS}s per case"

RTT_NS="pcb$$"
RTT_GATEWAY_NS="$RTT_NS-gateway"
RTT_CLIENT_NS="$RTT_NS-client"
# rtt_config QUEUE DIRECTION MODE: the gateway's config. The limit is in force when MODE is
# fresh; otherwise its window is two hours away (a budget a reload adds would only apply to
# tunnels opened after it: the reload moves the window of one the tunnel already has).
rtt_config() {
  # No other section's policy lines (gateway_config adds those of NAME_FOR_CONFIG).
  NAME_FOR_CONFIG=rtt
  cat > "$WORK/rtt.toml" <<EOF
$(gateway_config 10.99.0.2:3128 10.99.0.1/32 8000)
throttle_queue = "$1"
$(if [ "$3" = fresh ]; then one_way "$RTT_LIMIT B/s" "$2"; else one_way "$RTT_LIMIT B/s" "$2" "$LATER"; fi)
EOF
}

for rtt in $RTT_CASES; do
  python3 bench/delay_line.py "$RTT_NS" "$((rtt / 2))" > "$WORK/delay.out" 2>&1 &
  delay_pid=$!
  PIDS+=("$delay_pid")
  for _ in $(seq 100); do grep -q ready "$WORK/delay.out" && break; sleep 0.1; done
  if ! grep -q ready "$WORK/delay.out"; then
    # No namespaces here (a container without CAP_SYS_ADMIN, say): say so and go on.
    echo "rtt: skipped (the delay line did not start: $(tail -n 1 "$WORK/delay.out"))"
    stop_pid "$delay_pid"
    return 0
  fi
  # ip netns exec replaces itself with the command, so $! is the command's own PID.
  ip netns exec "$RTT_GATEWAY_NS" "$LOADGEN" origin --port 8000 --tls-port 8001 --ca "$WORK/rtt-ca.der" \
    2>"$WORK/rtt-origin.log" &
  origin_pid=$!
  PIDS+=("$origin_pid")
  wait_port 8000 "$RTT_GATEWAY_NS"
  for mode in fresh free-then; do
    queues=$RTT_QUEUES
    [ "$mode" = fresh ] && queues=100ms
    for queue in $queues; do
      for dir in up down; do
        rtt_config "$queue" "$dir" "$mode"
        ip netns exec "$RTT_GATEWAY_NS" "$GATEWAY" serve --config "$WORK/rtt.toml" > "$WORK/rtt-gateway.log" 2>&1 &
        gateway_pid=$!
        PIDS+=("$gateway_pid")
        wait_port 3128 "$RTT_GATEWAY_NS"
        warmup=4
        reload_pid=""
        if [ "$mode" = free-then ]; then
          warmup=7
          # After 3 s of running free the limit begins; the window starts 4 s later.
          (sleep 3; rtt_config "$queue" "$dir" fresh; kill -HUP "$gateway_pid") &
          reload_pid=$!
        fi
        ip netns exec "$RTT_CLIENT_NS" "$LOADGEN" throttle --name "queue-$queue" --proxy 10.99.0.2:3128 \
          --origin-port 8000 --direction "$dir" --seconds "$RTT_SECS" --warmup "$warmup" \
          --limit "$RTT_LIMIT" --label "rtt$rtt-$mode-" \
          | sed 's/"scenario":"throttle"/"scenario":"rtt"/' >> "$RESULTS"
        if [ -n "$reload_pid" ]; then wait "$reload_pid" || true; fi
        stop_pid "$gateway_pid"
      done
    done
  done
  stop_pid "$origin_pid"
  stop_pid "$delay_pid"
done

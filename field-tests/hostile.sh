#!/usr/bin/env bash
# A hostile user and a field engineer against `lime up` on loopback, as in
# issue 19: strangers, a rogue plan, junk on the plan topic, a robot taking a
# stage's client id, answers sent to control topics, a SIGKILLed stage, and
# the starter's memory after large prompts. Prints one line per try; exits
# non-zero if any try gets the wrong result. Bounded: about two minutes.
# Needs the release binaries (cargo build --release) and mosquitto-clients.
set -uo pipefail
cd "$(dirname "$0")/.."
lime=target/release/lime
dir=$(mktemp -d /tmp/lime-hostile.XXXXXX)
failed=0
say() { printf '%-58s %s\n' "$1" "$2"; }
check() { # what, expected (grep -E), got
  if grep -Eq "$2" <<<"$3"; then say "$1" "ok: $(grep -Em1 "$2" <<<"$3" | cut -c1-150)"; else
    say "$1" "WRONG: $(head -c 300 <<<"$3" | tr '\n' ' ')"; failed=1; fi
}

# A broker without logins does not start unless told.
out=$(LIME_BROKER_V4_LISTEN=127.0.0.1:18830 LIME_BROKER_V5_LISTEN=127.0.0.1:18840 \
  timeout 10 target/release/lime-broker 2>&1)
check "lime-broker with no logins" "allow_anonymous is off" "$out"

"$lime" up --dir "$dir" --stages 4 >"$dir/up.out" 2>&1 &
up=$!
trap 'kill -INT $up 2>/dev/null; wait $up 2>/dev/null' EXIT
for _ in $(seq 300); do grep -q "Ctrl-C stops" "$dir/up.out" && break; sleep 1; done
grep -q "Ctrl-C stops" "$dir/up.out" || { cat "$dir/up.out"; exit 1; }
robot_pw=$(sed -n 's/^logins: robot "robot" password "\([^"]*\)".*/\1/p' "$dir/up.out")
svc_pw=$(sed -n 's/.*service login "lime" password "\([^"]*\)".*/\1/p' "$dir/up.out")
ask() { # prompt [max tokens]
  LIME_MQTT_PASSWORD=$robot_pw timeout 60 "$lime" ask --user robot --max-tokens "${2:-8}" "$1" 2>&1
}

check "anonymous subscriber to #" "refused|not authori|bad user" \
  "$(timeout 5 mosquitto_sub -p 1883 -t '#' -W 2 2>&1)"
check "robot asks" "tokens/s" "$(ask 'Robot, status?')"

# A service login without the ring key publishes a rogue plan, then junk.
plan=$(timeout 5 mosquitto_sub -p 1883 -u lime -P "$svc_pw" -t lime/control/plan -C 1 -W 3)
# The planner picks the ring order: the starter is the plan's first stage.
stage_of() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])["stages"][int(sys.argv[2])]["name"])' "$plan" "$1"; }
starter=$(stage_of 0) other=$(stage_of 1) third=$(stage_of 2)
rogue=$(python3 -c 'import json,sys; p=json.loads(sys.argv[1]); p["epoch"]+=1000; p.pop("signature",None); p["stages"][1]["data_addr"]="127.0.0.1:9"; print(json.dumps(p))' "$plan")
mosquitto_pub -p 1883 -u lime -P "$svc_pw" -t lime/control/plan -r -q 1 -m "$rogue"
sleep 1
check "stages refuse the unsigned rogue plan" "refusing a plan" "$(cat "$dir/$other.log")"
check "the ring still answers after the rogue plan" "tokens/s" "$(ask 'Robot, where now?')"
mosquitto_pub -p 1883 -u lime -P "$svc_pw" -t lime/control/plan -r -q 1 -m '{"junk":1}'
sleep 1
kill -KILL "$(pgrep -f "$dir/$third.toml" | head -1)"
# lime up's supervisor restarts it, keeping the first life's log apart.
for _ in $(seq 60); do
  [ -f "$dir/$third.before-restart.log" ] && grep -q 'stage online' "$dir/$third.log" && break; sleep 1
done
check "a stage restarted after junk on the plan topic" "stage online" \
  "$([ -f "$dir/$third.before-restart.log" ] && cat "$dir/$third.log")"
check "the retained plan is the signed running one again" '"signature"' \
  "$(timeout 5 mosquitto_sub -p 1883 -u lime -P "$svc_pw" -t lime/control/plan -C 1 -W 3)"

# A robot taking the starter's client id, repeatedly.
for _ in 1 2 3; do timeout 2 mosquitto_sub -p 1883 -u robot -P "$robot_pw" -i "lime-stage-$starter" \
  -t lime/response/robot/x -W 1 >/dev/null 2>&1; done
check "asks after a robot took the starter's client id 3 times" "tokens/s" "$(ask 'Robot, again?')"

# Answers sent to a control topic.
sub=$(timeout 8 mosquitto_sub -p 1883 -u lime -P "$svc_pw" -t lime/response/x1 -C 1 -W 8 &
  sleep 1; mosquitto_pub -p 1883 -u lime -P "$svc_pw" -t lime/request -q 1 \
  -m '{"id":"x1","prompt":"hi","reply_to":"lime/control/plan"}'; wait)
check "reply_to lime/control/plan (service login)" "forbidden_reply_topic" "$sub"

# A stage killed under load: its requests are answered in full.
replays=$(grep -c "replaying every sequence" "$dir/$starter.log")
(for i in 1 2 3 4; do ask "Robot $i, report everything." 400 & done; wait) >"$dir/asks.out" 2>&1 &
asks=$!
sleep 1
kill -KILL "$(pgrep -f "$dir/$other.toml" | head -1)"
wait $asks
check "answers of 4 requests across a SIGKILL of a stage" "^4$" "$(grep -c 'tokens/s' "$dir/asks.out")"
check "the starter replayed them" "replayed=[1-9]" "$(grep "replaying every sequence" "$dir/$starter.log" | tail -n +$((replays + 1)))"

# The starter's memory after large prompts (refused by the context, tokenized all the same).
rss() { awk '/VmRSS/ {print $2}' "/proc/$(pgrep -f "$dir/$starter.toml" | head -1)/status"; }
before=$(rss)
for i in $(seq 30); do
  python3 -c 'import json,sys; print(json.dumps({"id": "big" + sys.argv[1], "prompt": "obstacle " * 28000}))' "$i" >"$dir/big.json"
  mosquitto_pub -p 1883 -u robot -P "$robot_pw" -t lime/request -q 1 -f "$dir/big.json"
done
sleep 5
after=$(rss)
say "starter RSS before / after 30 prompts of 250 KB" "$((before / 1024)) MiB / $((after / 1024)) MiB"
exit $failed

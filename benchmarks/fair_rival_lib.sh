# Steps shared by the fair-rival drivers (fair_rival.sh, fair_rival_qwen.sh); sourced, not run.
# Finished runs and calibrations are reused, so a driver can be stopped and started again.

log() { echo "[$(basename "$0" .sh) $(date -u +%H:%M:%S)] $*"; }

train_run() {  # train_run OUT FLAG...: `firstskip train --lora --merge`, resuming an interrupted run
  local R=$1; shift
  if [ ! -f "$R/model/config.json" ]; then
    log "train $R $*"
    firstskip train --out "$R" --lora --merge "$@" $( [ -d "$R" ] && echo --resume )
  fi
}

layers_of() {  # layers_of RUN: how many layers a static-set run skips
  python -c "import json,sys; print(len(json.load(open(sys.argv[1]+'/config.json'))['static_skip']))" "$1"
}

calibrated_copy() {  # calibrated_copy SRC COPY RIVAL DATA_FLAG...: COPY = SRC calibrated to RIVAL's decode saving
  local SRC=$1 C=$2 RIVAL=$3; shift 3
  local T; T=$(python -c "import json,sys; c=json.load(open(sys.argv[1]+'/config.json')); print(round(len(c['static_skip'])/c['num_layers'], 6))" "$RIVAL")
  if [ ! -f "$C/.calibrated-$T" ]; then
    log "calibrate $C --saving-target $T"
    rm -rf "$C" "$C.tmp"
    mkdir "$C.tmp"
    cp "$SRC/config.json" "$SRC/train_log.jsonl" "$C.tmp/"
    for f in model adapter routers.safetensors; do ln -s "$(pwd)/$SRC/$f" "$C.tmp/$f"; done
    firstskip calibrate -r "$C.tmp" "$@" --saving-target "$T" --snap 8
    mv "$C.tmp" "$C" && touch "$C/.calibrated-$T"
  fi
}

reuse_lora_only() {  # reuse_lora_only FROM TO: LoRA-only's predictions (the same weights at every budget)
  local f ds
  for f in "$1"/predictions/*/lora-only.jsonl; do
    [ -f "$f" ] || continue
    ds=$(basename "$(dirname "$f")")
    mkdir -p "$2/predictions/$ds"
    [ -f "$2/predictions/$ds/lora-only.jsonl" ] || cp "$f" "$2/predictions/$ds/"
  done
}

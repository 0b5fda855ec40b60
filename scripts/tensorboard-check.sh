#!/usr/bin/env bash
# Reads a fresh run's event file with TensorBoard's own Python reader: every
# curve is there with a point per epoch, the test figures, and the run's
# hyperparameters for the HParams dashboard. Optional (needs pip and network
# once): TB_PYTHON names a Python that has `tensorboard`, else a venv is made
# in /tmp/tensorboard-check-venv.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${TB_PYTHON:-}"
if [ -z "$python" ]; then
    venv=/tmp/tensorboard-check-venv
    [ -x "$venv/bin/python" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q tensorboard; }
    python="$venv/bin/python"
fi
cargo build --release --quiet
work=$(mktemp -d)
./target/release/mnist-lab run configs/lenet5_reg.toml --runs-dir "$work" \
    --set train.epochs=3 --set data.train_size=3000 >/dev/null 2>&1
"$python" - "$work" <<'PY'
import glob, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

run = glob.glob(sys.argv[1] + "/*")[0]
events = EventAccumulator(run)
events.Reload()
tags = events.Tags()["scalars"]
for tag in ["loss/train", "loss/validation", "accuracy/train", "accuracy/validation", "learning_rate"]:
    assert [e.step for e in events.Scalars(tag)] == [1, 2, 3], tag
assert events.Scalars("test/accuracy")[0].value > 0.5
plugin = events.PluginTagToContent("hparams")
start = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/session_start_info"])
hparams = start.session_start_info.hparams
assert hparams["model.batch_norm"].bool_value and hparams["optimizer.lr"].number_value > 0
end = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/session_end_info"])
assert end.session_end_info.status == 1  # STATUS_SUCCESS
print(f"tensorboard-check: ok: {len(tags)} curves, {len(hparams)} hyperparameters, test accuracy "
      f"{events.Scalars('test/accuracy')[0].value:.4f}")
PY
rm -rf "$work"

# Sourced by the device scripts: maps a plain checkout's top-level folders under `effexport` in /tmp
# (no install needed on the GPU machine) and sets PYTHONPATH / PYTHONUNBUFFERED.
ns=/tmp/effexport_ns/effexport
mkdir -p "$ns" && cp exporter/_root/__init__.py exporter/_root/runtime.py "$ns/"
for d in exporter passes custom_ops samples; do ln -sfn "$PWD/$d" "$ns/$d"; done
export PYTHONPATH=/tmp/effexport_ns${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

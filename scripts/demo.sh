#!/usr/bin/env bash
# syncd's main job end to end on this machine, no AWS account needed:
#   a local S3 server (rclone serve s3 on 127.0.0.1), a CloudFront test key pair, a sample
#   exec_* result with its metadata, `syncd run` watching, a completion marker dropped,
#   then the objects in the bucket and the rewritten metadata.
# Everything lives in $DEMO_DIR (default: a new temporary folder); servers stop on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/bootstrap.sh
PY=.venv/bin/python
DEMO_DIR="${DEMO_DIR:-$(mktemp -d -t syncd-demo.XXXXXX)}"
mkdir -p "$DEMO_DIR"
DEMO_DIR="$(cd "$DEMO_DIR" && pwd)"
echo "== demo folder: $DEMO_DIR"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

port="$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
mkdir -p "$DEMO_DIR/s3-root/results" "$DEMO_DIR/outputs"
: > "$DEMO_DIR/rclone.conf"
.venv/bin/rclone serve s3 --addr "127.0.0.1:$port" --auth-key demokey,demosecret \
  --config "$DEMO_DIR/rclone.conf" ":local:$DEMO_DIR/s3-root" 2> "$DEMO_DIR/rclone.log" &
pids+=($!)
$PY -c 'import socket, sys, time
while socket.socket().connect_ex(("127.0.0.1", int(sys.argv[1]))): time.sleep(0.1)' "$port"
echo "== local S3 server: rclone serve s3 on http://127.0.0.1:$port, bucket 'results'"

$PY - "$DEMO_DIR" <<'PYTHON'
"""A CloudFront test key pair and a small Earth2Studio-like result with its metadata."""
import json, os, sys
from pathlib import Path
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

demo = Path(sys.argv[1])
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
(demo / "cloudfront-private-key.pem").write_bytes(key.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
    serialization.NoEncryption()))
(demo / "cloudfront-public-key.pem").write_bytes(key.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

exec_id = "exec_1769560728_10ed9d3c"
zarr = demo / "outputs" / "deterministic" / exec_id / "results.zarr"
(zarr / "t2m").mkdir(parents=True)
(zarr / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
(zarr / "t2m" / ".zarray").write_text(json.dumps({
    "zarr_format": 2, "shape": [2, 256, 256], "chunks": [1, 256, 256], "dtype": "<f4",
    "compressor": None, "fill_value": None, "filters": None, "order": "C"}))
for step in range(2):
    (zarr / "t2m" / f"{step}.0.0").write_bytes(os.urandom(256 * 256 * 4))
(demo / "outputs" / "deterministic" / f"{exec_id}.json").write_text(json.dumps({
    "request_id": exec_id, "status": "completed", "workflow_name": "deterministic",
    "storage_type": "server", "parameters": {"start_time": ["2025-08-21T06:00:00"]}}, indent=2))
PYTHON
echo "== sample result: outputs/deterministic/exec_1769560728_10ed9d3c (a 4-file Zarr store) + its metadata"

cat > "$DEMO_DIR/config.yaml" <<YAML
object_storage:
  enabled: true
  bucket: results
  prefix: outputs
  endpoint_url: http://127.0.0.1:$port
  access_key_id: demokey
  secret_access_key: demosecret
  use_transfer_acceleration: false
  cloudfront_domain: https://d111111abcdef8.cloudfront.net
  cloudfront_key_pair_id: KDEMOKEYPAIR
  cloudfront_private_key_path: $DEMO_DIR/cloudfront-private-key.pem
  signed_url_expires_in: 3600
syncd:
  outputs_dir: $DEMO_DIR/outputs
  state_dir: $DEMO_DIR/state
YAML
echo "== syncd check"
.venv/bin/syncd check --config "$DEMO_DIR/config.yaml" | tail -n 3

echo "== syncd run (log below), then the workflow drops its completion marker"
.venv/bin/syncd run --config "$DEMO_DIR/config.yaml" 2> >(tee "$DEMO_DIR/syncd.log" >&2) &
pids+=($!)
until grep -q "syncd watching" "$DEMO_DIR/syncd.log" 2>/dev/null; do sleep 0.1; done
touch "$DEMO_DIR/outputs/deterministic/.exec_1769560728_10ed9d3c.done.tmp"
mv "$DEMO_DIR/outputs/deterministic/.exec_1769560728_10ed9d3c.done.tmp" \
   "$DEMO_DIR/outputs/deterministic/exec_1769560728_10ed9d3c.done"
meta="$DEMO_DIR/outputs/deterministic/exec_1769560728_10ed9d3c.json"
for _ in $(seq 1 600); do grep -q '"storage_type": "s3"' "$meta" && break; sleep 0.1; done
grep -q '"storage_type": "s3"' "$meta" || { echo "== FAILED: metadata not recorded in 60 s" >&2; exit 1; }
kill -TERM "${pids[1]}"; wait "${pids[1]}" && echo "== syncd stopped on SIGTERM with exit code 0"

echo "== syncd status"
.venv/bin/syncd status --config "$DEMO_DIR/config.yaml"
echo "== objects in the bucket (rclone's folder s3-root/results):"
(cd "$DEMO_DIR/s3-root/results" && find . -type f -printf '%P  %s bytes\n' | sort)
diff -r "$DEMO_DIR/outputs/deterministic/exec_1769560728_10ed9d3c" \
        "$DEMO_DIR/s3-root/results/outputs/deterministic/exec_1769560728_10ed9d3c" \
  && echo "== bucket copy is byte-identical to the local tree"
echo "== rewritten metadata $meta:"
cat "$meta"
$PY - "$meta" "$DEMO_DIR/cloudfront-public-key.pem" <<'PYTHON'
"""Check the signed URL as CloudFront would: the RSA signature with the public key, the expiry."""
import base64, json, sys, time
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

meta = json.load(open(sys.argv[1]))
public = serialization.load_pem_public_key(open(sys.argv[2], "rb").read())
query = dict(p.split("=", 1) for p in meta["signed_url"].split("?", 1)[1].split("&"))
unb64 = lambda s: base64.b64decode(s.replace("-", "+").replace("_", "=").replace("~", "/"))
policy = unb64(query["Policy"])
public.verify(unb64(query["Signature"]), policy, padding.PKCS1v15(), hashes.SHA1())
statement = json.loads(policy)["Statement"][0]
left = statement["Condition"]["DateLessThan"]["AWS:EpochTime"] - time.time()
print(f"== signed URL verified with the public key: covers {statement['Resource']}, "
      f"valid for {left / 60:.0f} more minutes")
PYTHON

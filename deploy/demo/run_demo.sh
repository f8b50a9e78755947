#!/usr/bin/env bash
# `make demo`: the gateway beside a PACS with a radiologist's viewer, on this machine, with the shared
# chest studies. Orthanc (DICOMweb + Web Viewer plugins) is the PACS, `cxr-gateway serve` analyses what
# a "modality" (storescu) sends and stores its results in Orthanc, and OHIF 3.13 reads Orthanc through
# deploy/demo/viewer_proxy.py (one origin). Prints an OHIF link per study and the dashboard's login, then
# runs until Ctrl-C, which stops everything. State and logs: build/demo (emptied at every start).
#
# Ports (default, or a free one when taken): DEMO_VIEWER_PORT 3000, DEMO_DASHBOARD_PORT 8080,
# DEMO_ORTHANC_HTTP_PORT 8042, DEMO_ORTHANC_DICOM_PORT 4242, DEMO_GATEWAY_PORT 11112. All on 127.0.0.1.
# Studies: DEMO_STUDIES (a glob; default ../shared/dicom/chest/*.dcm beside the repo).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
DEMO=build/demo
OHIF_VERSION=3.13.2
OHIF_DIST=${CXR_OHIF_DIST:-$ROOT/build/ohif/dist}
ORTHANC=${ORTHANC_BIN:-/usr/sbin/Orthanc}
PLUGINS=/usr/share/orthanc/plugins
STUDIES=${DEMO_STUDIES:-$ROOT/../shared/dicom/chest/*.dcm}

say() { printf '%s\n' "$*" >&2; }
die() { say "demo: $*"; exit 1; }

[ -x "$PY" ] || die "no virtual environment at $VENV (make install)"
[ -x "$ORTHANC" ] || die "Orthanc not found at $ORTHANC (apt-get install orthanc orthanc-dicomweb orthanc-webviewer)"
for lib in libOrthancDicomWeb.so libOrthancWebViewer.so; do
  [ -f "$PLUGINS/$lib" ] || die "$PLUGINS/$lib missing (apt-get install orthanc-dicomweb orthanc-webviewer)"
done
# DCMTK by its path: pynetdicom installs its own storescu into the venv, which may come first on PATH.
for tool in storescu dcmodify dcmdump; do
  [ -x "/usr/bin/$tool" ] || die "/usr/bin/$tool not found (apt-get install dcmtk)"
done
# shellcheck disable=SC2206  # the glob is meant to expand
files=($STUDIES)
[ -f "${files[0]}" ] || die "no study matches $STUDIES"

# --- OHIF's prebuilt viewer (the same pinned release `make test` unpacks)
if [ ! -f "$OHIF_DIST/index.html" ]; then
  [ "$OHIF_DIST" = "$ROOT/build/ohif/dist" ] || die "CXR_OHIF_DIST=$OHIF_DIST has no index.html"
  command -v npm >/dev/null || die "npm is needed once to fetch @ohif/app@$OHIF_VERSION (apt-get install npm)"
  say "fetching OHIF $OHIF_VERSION (npm pack @ohif/app, about 60 MB)…"
  mkdir -p build/ohif
  unpack=$(mktemp -d build/ohif/unpack.XXXXXX)
  (cd "$unpack" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null) || die "npm pack @ohif/app failed"
  tar -xzf "$unpack"/ohif-app-*.tgz -C "$unpack" package/dist
  rm -rf build/ohif/dist && mv "$unpack/package/dist" build/ohif/dist && rm -rf "$unpack"
  echo "$OHIF_VERSION" >build/ohif/VERSION
fi

# --- ports: the default when free, else one the kernel picks
port() {
  "$PY" -c 'import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])' "$1"
}
VIEWER_PORT=$(port "${DEMO_VIEWER_PORT:-3000}")
DASHBOARD_PORT=$(port "${DEMO_DASHBOARD_PORT:-8080}")
ORTHANC_HTTP=$(port "${DEMO_ORTHANC_HTTP_PORT:-8042}")
ORTHANC_DICOM=$(port "${DEMO_ORTHANC_DICOM_PORT:-4242}")
GATEWAY_PORT=$(port "${DEMO_GATEWAY_PORT:-11112}")

# --- start from nothing; stop everything on Ctrl-C or any exit
rm -rf "$DEMO"
mkdir -p "$DEMO/orthanc" "$DEMO/gateway" "$DEMO/in"
# Each server runs in its own session (setsid): Ctrl-C reaches this script only, which then sends SIGTERM
# to each main process (serve stops its own listener, worker and dashboard; a SIGINT to the whole group
# would also hit Celery's pool children).
pids=()
stop() {
  trap - INT TERM EXIT
  say "stopping…"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop EXIT
trap 'stop; exit 130' INT TERM

wait_http() {  # URL SECONDS WHAT
  "$PY" - "$@" <<'EOF' || die "$3 did not answer at $1 (logs in build/demo)"
import sys, time, urllib.request
url, limit = sys.argv[1], time.monotonic() + float(sys.argv[2])
while time.monotonic() < limit:
    try:
        urllib.request.urlopen(url, timeout=2)
        sys.exit(0)
    except Exception:
        time.sleep(0.3)
sys.exit(1)
EOF
}

# --- Orthanc: the PACS, with DICOMweb for OHIF and its own web viewer; knows the gateway as a modality
cat >"$DEMO/orthanc/orthanc.json" <<EOF
{
  "Name": "cxr-gateway demo PACS",
  "StorageDirectory": "$ROOT/$DEMO/orthanc/storage",
  "IndexDirectory": "$ROOT/$DEMO/orthanc/index",
  "Plugins": ["$PLUGINS/libOrthancDicomWeb.so", "$PLUGINS/libOrthancWebViewer.so"],
  "DicomWeb": {"Enable": true, "Root": "/dicom-web/", "EnableWado": true, "WadoRoot": "/wado"},
  "WebViewer": {"CachePath": "$ROOT/$DEMO/orthanc/webviewer-cache"},
  "HttpPort": $ORTHANC_HTTP,
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "DicomAet": "ORTHANC",
  "DicomPort": $ORTHANC_DICOM,
  "DicomModalities": {"gateway": ["CXR_GATEWAY", "127.0.0.1", $GATEWAY_PORT]},
  "DicomAlwaysAllowStore": true,
  "DicomCheckCalledAet": false
}
EOF
setsid "$ORTHANC" "$DEMO/orthanc/orthanc.json" >"$DEMO/orthanc.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$ORTHANC_HTTP/system" 30 Orthanc

# --- the gateway, its results to that Orthanc; a dashboard login for this run
PASSWORD=$("$PY" -c 'import secrets; print(secrets.token_urlsafe(12))')
USERS="[$("$PY" -m service.admin.passwords --username admin --role admin --password "$PASSWORD")]"
VIEWER="http://127.0.0.1:$VIEWER_PORT"
CXR_DATA_DIR="$DEMO/gateway" \
  CXR_LISTENER_HOST=127.0.0.1 CXR_LISTENER_PORT="$GATEWAY_PORT" CXR_DASHBOARD_PORT="$DASHBOARD_PORT" \
  CXR_DESTINATIONS="[{\"ae_title\": \"ORTHANC\", \"host\": \"127.0.0.1\", \"port\": $ORTHANC_DICOM}]" \
  CXR_DASHBOARD_USERS="$USERS" CXR_VIEWER_URL="$VIEWER/viewer?StudyInstanceUIDs={study_uid}" \
  setsid "$VENV/bin/cxr-gateway" serve >"$DEMO/gateway.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$DASHBOARD_PORT/healthz" 120 "the gateway"

# --- OHIF and Orthanc's DICOMweb on one origin
setsid "$PY" deploy/demo/viewer_proxy.py --ohif-dist "$OHIF_DIST" --orthanc "http://127.0.0.1:$ORTHANC_HTTP" \
  --port "$VIEWER_PORT" >"$DEMO/viewer.log" 2>&1 &
pids+=($!)
wait_http "$VIEWER/app-config.js" 15 "the viewer proxy"

# --- the "modality": each file as its own study (the shared files are one image in several encodings),
# sent to the PACS and to the gateway, proposing the file's own transfer syntax
declare -A PROPOSE=(
  [1.2.840.10008.1.2.4.50]=-xy [1.2.840.10008.1.2.4.51]=-xx [1.2.840.10008.1.2.4.57]=-xs
  [1.2.840.10008.1.2.4.70]=-xs [1.2.840.10008.1.2.4.80]=-xt [1.2.840.10008.1.2.4.81]=-xu
  [1.2.840.10008.1.2.4.90]=-xv [1.2.840.10008.1.2.4.91]=-xw
)
tag() { /usr/bin/dcmdump -q -s -Un +P "$1" "$2" | sed -n 's/.*\[\([0-9.]*\)\].*/\1/p' | head -1; }
declare -A NAMES=()
for file in "${files[@]}"; do
  copy="$DEMO/in/$(basename "$file")"
  cp "$file" "$copy"
  /usr/bin/dcmodify -nb -gst -gse -gin "$copy" >/dev/null
  syntax=$(tag TransferSyntaxUID "$copy")
  NAMES[$(tag StudyInstanceUID "$copy")]=$(basename "$file" .dcm)
  # shellcheck disable=SC2086  # an empty proposal option must vanish
  for peer in "ORTHANC:$ORTHANC_DICOM" "CXR_GATEWAY:$GATEWAY_PORT"; do
    /usr/bin/storescu -aet DEMO_MODALITY -aec "${peer%:*}" ${PROPOSE[$syntax]:-} 127.0.0.1 "${peer#*:}" "$copy" \
      || die "storescu to ${peer%:*} failed for $(basename "$file")"
  done
done
say "sent ${#files[@]} studies; waiting for the results (the first run loads the model)…"

# --- wait until every job is final and its results are in Orthanc
"$PY" - "http://127.0.0.1:$DASHBOARD_PORT" "$PASSWORD" "${#files[@]}" <<'EOF' || die "no results in time (build/demo/gateway.log)"
import sys, time
import httpx
url, password, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
limit = time.monotonic() + 600
while time.monotonic() < limit:
    jobs = httpx.get(f"{url}/api/jobs", auth=("admin", password), timeout=10).json()["items"]
    final = [j for j in jobs if j["status"] in {"done", "skipped", "failed"}]
    sent = all(j["deliveries"] or j["status"] == "failed" for j in final)
    delivered = all(d["status"] in {"delivered", "dead_letter"} for j in final for d in j["deliveries"])
    if len(final) >= count and sent and delivered:
        for j in jobs:
            print(f"  job {j['id'][:8]}: {j['status']}" + (f" ({j['reason_code']})" if j["reason_code"] else ""))
        sys.exit(0)
    time.sleep(1)
sys.exit(1)
EOF

# --- where to look
say ""
say "  Studies in OHIF ($VIEWER/ lists them all):"
for study in "${!NAMES[@]}"; do
  say "    ${NAMES[$study]}: $VIEWER/viewer?StudyInstanceUIDs=$study"
done
say ""
say "  Dashboard http://127.0.0.1:$DASHBOARD_PORT  user: admin  password: $PASSWORD"
say "  Orthanc   http://127.0.0.1:$ORTHANC_HTTP/web-viewer/app/viewer.html?series=<series id>  (images only)"
say "  Send more: /usr/bin/storescu -aec CXR_GATEWAY 127.0.0.1 $GATEWAY_PORT <file>  (and to ORTHANC on $ORTHANC_DICOM)"
say "  Logs in $DEMO/. AI results, not for diagnostic use. Ctrl-C stops everything."
say ""
# Until Ctrl-C (the trap stops everything), or until one of the servers exits on its own.
wait -n "${pids[@]}" || true
say "demo: a server exited (logs in $DEMO/)"

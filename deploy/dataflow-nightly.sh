#!/usr/bin/env bash
# Nightly dn2 on Dataflow with GPU workers: a Cloud Scheduler job calls, every night, the
# Dataflow flex template launch API (projects.locations.flexTemplates.launch) for the
# template deploy/build.sh wrote, with `--partition yesterday`. The template's launcher
# runs `dn2 score` (deploy/launcher.py), which resolves yesterday to a UTC date at launch,
# checks the index and paths and submits the job; the job's own last step writes
# summary.json and commits the results (_SUCCESS), so nothing waits for it. With
# MAX_ERROR_FRACTION set, more than that fraction of the images erroring fails the job
# (after it committed the results, so they can be read).
#
# Usage, from the repository root, after deploy/build.sh:
#   PROJECT=my-project REGION=us-central1 BUCKET=my-bucket \
#   SERVICE_ACCOUNT=dn2-runner@my-project.iam.gserviceaccount.com deploy/dataflow-nightly.sh
# Optional (defaults in brackets):
#   IMAGE      [REGION-docker.pkg.dev/PROJECT/dn2/dn2:latest, what deploy/build.sh pushed]
#   TEMPLATE   [gs://BUCKET/dn2/templates/dn2-score.json, what deploy/build.sh wrote]
#   INPUT      [gs://BUCKET/images/dt={partition}/]   one partition of images per night
#   INDEX      [gs://BUCKET/dn2/index]                 built once with dn2 build-index
#   OUTPUT     [gs://BUCKET/dn2/results/dt={partition}/]
#   SCHEDULE   [0 3 * * *] (cron syntax, UTC)          scores yesterday's partition
#   GPU        [nvidia-l4]   MACHINE_TYPE [g2-standard-8] (L4 GPUs need G2 machines;
#              nvidia-tesla-t4 runs on N1 machines, e.g. n1-standard-8)
#              GPU=none: CPU workers (MACHINE_TYPE [n1-standard-4]), for projects
#              without GPU quota: ONNX Runtime, one SDK process per vCPU
#   The process model (docs/memory.md, "Embedding workers"): with a GPU, one SDK process
#   per worker (--experiments no_use_multiple_sdk_containers), whose threads share the
#   one model on the GPU, as Beam advises for RunInference on GPUs; without, Dataflow's
#   default of one process per vCPU, which share one ONNX Runtime model a machine
#   (--share-model auto with --device cpu): one process serves it on all the cores, each
#   process reads and decodes on its own.
#   MAX_WORKERS [4]   MAX_ERROR_FRACTION [unset: no limit], e.g. 0.05
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${BUCKET:?set BUCKET}"
: "${SERVICE_ACCOUNT:?set SERVICE_ACCOUNT (launches the job and runs the Dataflow workers)}"
IMAGE="${IMAGE:-${REGION}-docker.pkg.dev/${PROJECT}/dn2/dn2:latest}"
TEMPLATE="${TEMPLATE:-gs://${BUCKET}/dn2/templates/dn2-score.json}"
P='{partition}'  # kept literal for dn2 (inside ${VAR:-...} its '}' would end the default)
INPUT="${INPUT:-gs://${BUCKET}/images/dt=${P}/}"
INDEX="${INDEX:-gs://${BUCKET}/dn2/index}"
OUTPUT="${OUTPUT:-gs://${BUCKET}/dn2/results/dt=${P}/}"
SCHEDULE="${SCHEDULE:-0 3 * * *}"
GPU="${GPU:-nvidia-l4}"
MAX_WORKERS="${MAX_WORKERS:-4}"
MAX_ERROR_FRACTION="${MAX_ERROR_FRACTION:-}"
JOB=dn2-nightly

js() {  # a JSON string
    local s="${1//\\/\\\\}"
    printf '"%s"' "${s//\"/\\\"}"
}

if [[ "$GPU" == none ]]; then
    MACHINE_TYPE="${MACHINE_TYPE:-n1-standard-4}"
    DEVICE=cpu
    EXPERIMENTS=""
else
    MACHINE_TYPE="${MACHINE_TYPE:-g2-standard-8}"
    DEVICE=auto
    EXPERIMENTS="$(js "worker_accelerator=type:${GPU};count:1;install-nvidia-driver")"
    EXPERIMENTS+=", $(js no_use_multiple_sdk_containers)"
fi
LIMIT=""
if [[ -n "$MAX_ERROR_FRACTION" ]]; then
    LIMIT=", \"max_error_fraction\": $(js "$MAX_ERROR_FRACTION")"
fi
# The LaunchFlexTemplateRequest. Cloud Scheduler sends the same body every night, so the
# date is not in it: dn2 resolves --partition yesterday when the launcher runs it.
# parameters: dn2 score's options (deploy/metadata.json); auto: the workers' GPU embeds
# (see the README on --device cuda with Dataflow), cpu without one. environment: the
# Dataflow options.
BODY=$(cat <<EOF
{"launchParameter": {
  "jobName": $(js "$JOB"),
  "containerSpecGcsPath": $(js "$TEMPLATE"),
  "parameters": {
    "input": $(js "$INPUT"), "index": $(js "$INDEX"), "output": $(js "$OUTPUT"),
    "partition": "yesterday", "top": "100", "device": "${DEVICE}"${LIMIT}
  },
  "environment": {
    "serviceAccountEmail": $(js "$SERVICE_ACCOUNT"),
    "tempLocation": $(js "gs://${BUCKET}/dn2/tmp"),
    "stagingLocation": $(js "gs://${BUCKET}/dn2/staging"),
    "sdkContainerImage": $(js "$IMAGE"),
    "machineType": $(js "$MACHINE_TYPE"),
    "maxWorkers": ${MAX_WORKERS},
    "additionalExperiments": [${EXPERIMENTS}]
  }
}}
EOF
)

URI="https://dataflow.googleapis.com/v1b3/projects/${PROJECT}/locations/${REGION}/flexTemplates:launch"
verb=create headers=--headers
if gcloud scheduler jobs describe "$JOB" --project "$PROJECT" --location "$REGION" \
        >/dev/null 2>&1; then
    verb=update headers=--update-headers
fi
gcloud scheduler jobs "$verb" http "$JOB" --project "$PROJECT" --location "$REGION" \
    --schedule "$SCHEDULE" --time-zone Etc/UTC \
    --uri "$URI" --http-method POST \
    "$headers" "Content-Type=application/json" --message-body "$BODY" \
    --oauth-service-account-email "$SERVICE_ACCOUNT" \
    --oauth-token-scope "https://www.googleapis.com/auth/cloud-platform"
echo "scheduled ${JOB}: '${SCHEDULE}' UTC; launch it now with:"
echo "  gcloud scheduler jobs run ${JOB} --project ${PROJECT} --location ${REGION}"

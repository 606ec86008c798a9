#!/usr/bin/env bash
# Nightly dn2 on Dataflow with GPU workers: a Cloud Scheduler job starts, every night, a
# Cloud Run job that runs `dn2 score --runner DataflowRunner --partition yesterday` from
# dn2's image. That process submits the Dataflow job, waits for it, checks the outputs and
# commits them (_SUCCESS), so it must outlive the job: --task-timeout below.
#
# Usage, from the repository root, after deploy/build.sh:
#   PROJECT=my-project REGION=us-central1 BUCKET=my-bucket \
#   SERVICE_ACCOUNT=dn2-runner@my-project.iam.gserviceaccount.com deploy/dataflow-nightly.sh
# Optional (defaults in brackets):
#   IMAGE      [REGION-docker.pkg.dev/PROJECT/dn2/dn2:latest, what deploy/build.sh pushed]
#   INPUT      [gs://BUCKET/images/dt={partition}/]   one partition of images per night
#   INDEX      [gs://BUCKET/dn2/index]                 built once with dn2 build-index
#   OUTPUT     [gs://BUCKET/dn2/results/dt={partition}/]
#   SCHEDULE   [0 3 * * *] (cron syntax, UTC)          scores yesterday's partition
#   GPU        [nvidia-l4]   MACHINE_TYPE [g2-standard-8] (L4 GPUs need G2 machines;
#              nvidia-tesla-t4 runs on N1 machines, e.g. n1-standard-8)
#   MAX_WORKERS [4]
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${BUCKET:?set BUCKET}"
: "${SERVICE_ACCOUNT:?set SERVICE_ACCOUNT (runs the job and the Dataflow workers)}"
IMAGE="${IMAGE:-${REGION}-docker.pkg.dev/${PROJECT}/dn2/dn2:latest}"
P='{partition}'  # kept literal for dn2 (inside ${VAR:-...} its '}' would end the default)
INPUT="${INPUT:-gs://${BUCKET}/images/dt=${P}/}"
INDEX="${INDEX:-gs://${BUCKET}/dn2/index}"
OUTPUT="${OUTPUT:-gs://${BUCKET}/dn2/results/dt=${P}/}"
SCHEDULE="${SCHEDULE:-0 3 * * *}"
GPU="${GPU:-nvidia-l4}"
MACHINE_TYPE="${MACHINE_TYPE:-g2-standard-8}"
MAX_WORKERS="${MAX_WORKERS:-4}"
JOB=dn2-nightly

# dn2 score's arguments, then Beam's Dataflow options. Separated by @ for gcloud (^@^),
# because the accelerator option contains ';' and ':'.
ARGS=(
  score
  "--input=${INPUT}" "--index=${INDEX}" "--output=${OUTPUT}"
  # auto: the workers' GPU embeds (see the README on --device cuda with Dataflow)
  --partition=yesterday --top=100 --device=auto
  --runner=DataflowRunner "--project=${PROJECT}" "--region=${REGION}"
  "--temp_location=gs://${BUCKET}/dn2/tmp"
  "--sdk_container_image=${IMAGE}"
  "--service_account_email=${SERVICE_ACCOUNT}"
  "--machine_type=${MACHINE_TYPE}"
  "--dataflow_service_options=worker_accelerator=type:${GPU};count:1;install-nvidia-driver"
  "--max_num_workers=${MAX_WORKERS}"
)
joined="$(IFS=@; echo "${ARGS[*]}")"

gcloud run jobs deploy "$JOB" --project "$PROJECT" --region "$REGION" \
    --image "$IMAGE" --command dn2 --args "^@^${joined}" \
    --service-account "$SERVICE_ACCOUNT" \
    --cpu 2 --memory 4Gi --max-retries 0 --task-timeout 12h

URI="https://run.googleapis.com/v2/projects/${PROJECT}/locations/${REGION}/jobs/${JOB}:run"
verb=create
if gcloud scheduler jobs describe "$JOB" --project "$PROJECT" --location "$REGION" \
        >/dev/null 2>&1; then
    verb=update
fi
gcloud scheduler jobs "$verb" http "$JOB" --project "$PROJECT" --location "$REGION" \
    --schedule "$SCHEDULE" --time-zone Etc/UTC \
    --uri "$URI" --http-method POST \
    --oauth-service-account-email "$SERVICE_ACCOUNT"
echo "scheduled ${JOB}: '${SCHEDULE}' UTC; run it now with:"
echo "  gcloud run jobs execute ${JOB} --project ${PROJECT} --region ${REGION} --wait"

#!/usr/bin/env bash
# Builds and pushes dn2's Dataflow image and writes the flex template spec, on Cloud Build.
# Usage, from the repository root:
#   PROJECT=my-project REGION=us-central1 BUCKET=my-bucket deploy/build.sh
# Optional: REPO (Artifact Registry Docker repository, default dn2), TAG (default latest).
# Prints the image and template paths that deploy/dataflow-nightly.sh and the README use.
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${BUCKET:?set BUCKET}"
REPO="${REPO:-dn2}"
TAG="${TAG:-latest}"
IMAGE="${REGION}-docker.pkg.dev/${PROJECT}/${REPO}/dn2:${TAG}"
TEMPLATE="gs://${BUCKET}/dn2/templates/dn2-score.json"

cd "$(dirname "$0")/.."
if ! gcloud artifacts repositories describe "$REPO" --project "$PROJECT" \
        --location "$REGION" >/dev/null 2>&1; then
    gcloud artifacts repositories create "$REPO" --project "$PROJECT" \
        --location "$REGION" --repository-format docker
fi
gcloud builds submit . --project "$PROJECT" --region "$REGION" \
    --config deploy/cloudbuild.yaml \
    --substitutions "_IMAGE=${IMAGE},_TEMPLATE=${TEMPLATE}"
echo "IMAGE=${IMAGE}"
echo "TEMPLATE=${TEMPLATE}"

#!/usr/bin/env bash
# GCE spot VM startup script: runs at every boot, so a preempted and restarted VM resumes the job.
# Metadata: startup-script = this file; job-spec = gs://BUCKET/path/job.yaml (storage.root: gs://...);
# the Hugging Face token for a gated backbone (Llama-3): the Secret Manager secret named by the
# metadata hf-token-secret (the VM's service account needs secretmanager.versions.access), or
# else the metadata hf-token. It reaches the container as HF_TOKEN, through the environment only.
# GCE sends SIGTERM ~30 s before stopping a spot VM; Docker forwards it to timellm-job, which has
# the trainer commit a preempt checkpoint within its 25 s grace period (docker stop -t 30).
set -euo pipefail
META=http://metadata.google.internal/computeMetadata/v1/instance/attributes
SPEC_URL=$(curl -fs -H "Metadata-Flavor: Google" "$META/job-spec")
IMAGE=$(curl -fs -H "Metadata-Flavor: Google" "$META/timellm-image" || echo timellm-job:latest)
HF_SECRET=$(curl -fs -H "Metadata-Flavor: Google" "$META/hf-token-secret" || true)
if [ -n "$HF_SECRET" ]; then
  HF_TOKEN=$(gcloud secrets versions access latest --secret="$HF_SECRET")
else
  HF_TOKEN=$(curl -fs -H "Metadata-Flavor: Google" "$META/hf-token" || true)
fi
export HF_TOKEN
mkdir -p /var/lib/timellm-job/spec
gsutil cp "$SPEC_URL" /var/lib/timellm-job/spec/job.yaml
# -e HF_TOKEN (no value): docker copies it from this environment; it never appears in an argv
exec docker run --rm --gpus all --stop-timeout 30 -e HF_TOKEN \
  -v /var/lib/timellm-job:/var/lib/timellm-job \
  "$IMAGE" submit /var/lib/timellm-job/spec/job.yaml

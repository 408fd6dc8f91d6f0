#!/usr/bin/env bash
# GCE spot VM startup script: runs at every boot, so a preempted and restarted VM resumes the job.
# Metadata: startup-script = this file; job-spec = gs://BUCKET/path/job.yaml (storage.root: gs://...).
# GCE sends SIGTERM ~30 s before stopping a spot VM; Docker forwards it to timellm-job, which has
# the trainer commit a preempt checkpoint within its 25 s grace period (docker stop -t 30).
set -euo pipefail
META=http://metadata.google.internal/computeMetadata/v1/instance/attributes
SPEC_URL=$(curl -fs -H "Metadata-Flavor: Google" "$META/job-spec")
IMAGE=$(curl -fs -H "Metadata-Flavor: Google" "$META/timellm-image" || echo timellm-job:latest)
mkdir -p /var/lib/timellm-job/spec
gsutil cp "$SPEC_URL" /var/lib/timellm-job/spec/job.yaml
exec docker run --rm --gpus all --stop-timeout 30 \
  -v /var/lib/timellm-job:/var/lib/timellm-job \
  "$IMAGE" submit /var/lib/timellm-job/spec/job.yaml

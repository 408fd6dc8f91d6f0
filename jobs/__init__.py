"""What a job is: the spec schema and the status document. Imports nothing else of ours."""

from timellm_job.jobs.identity import job_hashes, spec_hash, training_fields
from timellm_job.jobs.spec import JobSpec, SpecError
from timellm_job.jobs.spec_files import load_spec, parse_spec
from timellm_job.jobs.status import Attempt, JobStatus, Phase

__all__ = ["JobSpec", "SpecError", "job_hashes", "load_spec", "parse_spec", "spec_hash", "training_fields",
           "Attempt", "JobStatus", "Phase"]

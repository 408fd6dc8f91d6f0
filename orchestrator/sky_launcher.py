"""SkyPilot's side of ``sweep --on skypilot``: run by SkyPilot's own Python, never imported by ours.

SkyPilot pins versions our dependencies cannot share (click, among others), so SkyPilot lives in
an environment of its own (``pipx install "skypilot[gcp]"``, as SkyPilot recommends) and this
file runs there, as a script: it imports SkyPilot and the standard library only.

Reads one JSON request on stdin::

    {"mode": "build" | "launch", "config": {the task file as a mapping}, "workdir": "/path",
     "jobs": [{"name": ..., "envs": {"JOB_SPEC": ...}, "secrets": {"HF_TOKEN": ...}}, ...]}

and builds each job's task with SkyPilot's own loader (``sky.Task.from_yaml_config``, the
``envs`` and ``secrets`` as its overrides). ``build`` stops there; ``launch`` hands each task to
``sky.jobs.launch`` as a managed job of that name and waits for SkyPilot to accept it. Writes
one JSON line on stdout: per job, what SkyPilot made of it (the secrets' names, never their
values) and, when launched, its managed job ids; or ``{"error": ...}`` with exit 2 when SkyPilot
refused a task, 1 when a launch failed.
"""

import copy
import json
import sys


def described(task) -> dict:
    (res,) = task.resources
    return {"name": task.name, "cloud": str(res.cloud) if res.cloud else None, "accelerators": res.accelerators,
            "use_spot": res.use_spot, "envs": dict(task.envs), "secrets": sorted(task.secrets),
            "workdir": task.workdir, "run": task.run}


def main() -> int:
    import sky

    request = json.load(sys.stdin)
    out = []
    tasks = []
    for job in request["jobs"]:
        try:
            task = sky.Task.from_yaml_config(copy.deepcopy(request["config"]), env_overrides=list(job["envs"].items()),
                                             secrets_overrides=list(job["secrets"].items()) or None)
            task.name = job["name"]
            task.workdir = request["workdir"]
        except Exception as err:  # SkyPilot's own refusal: bad input, said as SkyPilot says it
            print(json.dumps({"error": f"job {job['name']}: SkyPilot refused the task: {err}"}))
            return 2
        tasks.append(task)
        out.append(described(task))
    if request["mode"] == "launch":
        for task, said in [(tasks[i], out[i]) for i in range(len(tasks))]:
            try:
                job_ids, _ = sky.get(sky.jobs.launch(task, name=task.name))
            except Exception as err:
                print(json.dumps({"error": f"job {task.name}: sky.jobs.launch failed: {err}", "jobs": out}))
                return 1
            said["managed_job_ids"] = list(job_ids or [])
    print(json.dumps({"jobs": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

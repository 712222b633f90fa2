"""The base job template of the ``backjobs`` process pool: a run chooses no command and no
environment.

A process worker runs ``job_variables.command`` and merges ``job_variables.env`` from
whoever created the flow run, so anything that may create runs could run commands on the
worker host. This template is Prefect's default process template without those two
variables, and with a schema that refuses any job variable it does not name
(``additionalProperties: false``: the server answers 422 to a run or a deployment that
sets ``command`` or ``env``). The command is the worker's own (``python -m
prefect.engine``); the environment is fixed here, added to the worker's own:

- ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30``: runs send heartbeats, so a run whose process
  died is found (zombie-run detection; ``backjobs deploy`` reads it here to size each
  deployment's zombie window: three heartbeats, 90 s);
- ``PREFECT_LOGGING_EXTRA_LOGGERS=backjobs``: the domain's warnings reach the run's logs
  (it must be set before the run's process imports Prefect).

``name``, ``labels``, ``stream_output`` and ``working_dir`` stay as Prefect has them.
The local stack gives its pool this template; for a production pool, write it to a file
with ``python -m backjobs.stack.pool > backjobs-pool.json`` and pass it to ``prefect
work-pool create|update --base-job-template backjobs-pool.json`` (see the README).
"""

from __future__ import annotations

import copy
import json
from typing import Any

FIXED_ENV = {
    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "backjobs",
}
REMOVED_VARIABLES = ("command", "env")


def locked_process_template() -> dict[str, Any]:
    """Prefect's default process template with ``command`` and ``env`` taken from runs."""
    from prefect.workers.process import ProcessWorker

    template = copy.deepcopy(ProcessWorker.get_default_base_job_template())
    variables = template["variables"]
    for name in REMOVED_VARIABLES:
        variables["properties"].pop(name, None)
    variables["required"] = [
        name for name in variables.get("required", []) if name not in REMOVED_VARIABLES
    ]
    variables["additionalProperties"] = False
    configuration = template["job_configuration"]
    configuration["command"] = None
    configuration["env"] = dict(FIXED_ENV)
    return template


def template_json() -> str:
    return json.dumps(locked_process_template(), indent=2)


if __name__ == "__main__":
    print(template_json())

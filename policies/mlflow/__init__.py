"""MLflow mirror of the policy store (issue 6): runs, registered model versions, aliases, tags.

Every stored policy version becomes one MLflow run (params, metrics, the policy JSON, plots,
the audit report, and once it serves, its monitoring time series) and one version of the
registered model ``exit-policy-<model>`` with the pyfunc flavour of
:mod:`exitwise.policies.mlflow.pyfunc`. Aliases mirror the lifecycle: the
version active in environment ``production`` carries alias ``production``; the kill switch
shows as the tag ``exitwise.killed.<env>`` on the registered model (and ``exitwise.killed_in``
on the version). The policy database is the source of truth; MLflow is a mirror.

One job per module, each importable without mlflow (only ``pyfunc`` imports it at the top):

- :mod:`~exitwise.policies.mlflow.config` — where to mirror (tracking URIs, tag names, model URIs)
  and the one place mlflow is imported and configured (telemetry off, fail-fast HTTP);
- :mod:`~exitwise.policies.mlflow.errors` — MLflow failures as exitwise errors;
- :mod:`~exitwise.policies.mlflow.payload` — what one run holds: params, metrics, tags, plots;
- :mod:`~exitwise.policies.mlflow.publish` — the write path: log a run, register a version;
- :mod:`~exitwise.policies.mlflow.reconcile` — make MLflow match the desired state (idempotent);
- :mod:`~exitwise.policies.mlflow.monitor` — monitoring time series and verdicts as run metrics;
- :mod:`~exitwise.policies.mlflow.lookup` — which MLflow version an alias or store version is;
- :mod:`~exitwise.policies.mlflow.sync` — the database side: pending models, sync and record;
- :mod:`~exitwise.policies.mlflow.worker` — the after-commit hook (inline or a worker thread);
- :mod:`~exitwise.policies.mlflow.pyfunc` — the pyfunc model MLflow loads.

Nothing is re-exported here: the pyfunc entry point imports this package when a model is
loaded, and must not pull in the store.
"""

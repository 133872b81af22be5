"""exitwise policy domain: documents, store, governance, MLflow, reports, runtime client.

Kept import-light: ``exitwise.policies.runtime`` must be importable with numpy and httpx only.
"""

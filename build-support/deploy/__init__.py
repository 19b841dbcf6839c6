"""Deploy tooling run by cloudbuild.yaml: which services a commit affects, their Cloud Run manifests, IAM."""

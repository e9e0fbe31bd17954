#!/usr/bin/env bash
# Run a kvc sweep on Kubernetes: the Indexed Job, wait for it, then the merge Job.
#   bash deploy/kubernetes/run.sh [TIMEOUT_SECONDS]   (default 172800: two days)
# Needs kubectl with a context, the claims kvc-results and hf-cache (ReadWriteMany), and the
# Secret: kubectl create secret generic hf-token --from-literal=token=$HF_TOKEN
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
deadline=$((SECONDS + ${1:-172800}))
kubectl apply -f "$here/kvc-sweep-job.yaml"
# A Job with failed indexes ends Failed, not Complete: wait for either; the merge names gaps.
until state=$(kubectl get job kvc-sweep -o jsonpath='{.status.conditions[*].type}'); \
      [[ $state == *Complete* || $state == *Failed* ]]; do
  (( SECONDS < deadline )) || { echo "run.sh: job/kvc-sweep still running at the deadline" >&2; exit 1; }
  sleep 30
done
echo "job/kvc-sweep: $state"
kubectl delete job kvc-merge --ignore-not-found
kubectl apply -f "$here/kvc-merge-job.yaml"
kubectl wait --for=condition=complete --timeout=1h job/kvc-merge
kubectl logs job/kvc-merge

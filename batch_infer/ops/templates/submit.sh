# The pod of batch-infer's CronJob (batch-infer schedule --emit kubernetes): create this run's
# RayJob, wait for it, print the run's log, delete the RayJob (KubeRay then deletes its
# RayCluster) and exit with the run's exit code:
#   0, 2, 3, 4  batch-infer run's own (read from the RayJob's status message, which carries
#               Ray's "Job entrypoint command failed with exit code N")
#   124         the run passed the RayJob's activeDeadlineSeconds
#   5           the cluster did not run it (not created, not submitted, stopped)
# A deadline or an eviction ends this pod with SIGTERM: the RayJob is deleted then too.
# POSIX sh: BATCH_INFER_JOB (the schedule's name) is set by the CronJob; POLL_SECONDS optional.
set -u
here=$(dirname "$0")
selector="batch-infer/job=$BATCH_INFER_JOB"

# RayJobs of earlier runs whose pod was killed before it could delete them, once finished.
for old in $(kubectl get rayjob -l "$selector" -o jsonpath='{range .items[*]}{.metadata.name}={.status.jobDeploymentStatus} {end}'); do
  case "$old" in
    *=Complete|*=Failed) kubectl delete rayjob "${old%=*}" --wait=false ;;
  esac
done

job=$(kubectl create -f "$here/rayjob.yaml" -o jsonpath='{.metadata.name}') || exit 5
trap 'kubectl delete rayjob "$job" --wait=false' EXIT
trap 'echo "stopped: deleting rayjob/$job"; exit 143' TERM INT
echo "created rayjob/$job"

while :; do
  state=$(kubectl get rayjob "$job" -o jsonpath='{.status.jobDeploymentStatus}/{.status.jobStatus}/{.status.reason}') || state=unknown
  case "$state" in
    Complete/*|Failed/*) break ;;
  esac
  sleep "${POLL_SECONDS:-30}" & wait $!   # a TERM interrupts the wait, not the sleep
done

echo "rayjob/$job: $state"
kubectl logs "job/$job" --tail=-1 || echo "(the submitter's log is gone)"
message=$(kubectl get rayjob "$job" -o jsonpath='{.status.message}') || message=""
code=$(printf '%s\n' "$message" | sed -n 's/.*failed with exit code \([0-9][0-9]*\).*/\1/p' | head -n 1)
case "$state" in
  Complete/SUCCEEDED/*) exit 0 ;;
  */DeadlineExceeded) exit 124 ;;
  */FAILED/*) exit "${code:-5}" ;;
  *) exit 5 ;;
esac

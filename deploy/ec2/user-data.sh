#!/bin/bash
# nightshift worker: user-data of the EC2 launch template `nightshift scaler --provider ec2`
# launches workers from (or that an Auto Scaling group uses).
#
# The AMI: a GPU AMI with the NVIDIA driver, CUDA 13 and cuDNN 9 (e.g. an AWS Deep Learning Base
# GPU AMI), the AWS CLI, `nightshift` in /usr/local/bin and onnxruntime-gpu==1.31.1 in
# /opt/venv (python3 -m venv /opt/venv && /opt/venv/bin/pip install onnxruntime-gpu==1.31.1),
# optionally a `nightshift` system user to run as. The instance profile may read the token's SSM
# parameter (ssm:GetParameter, kms:Decrypt) and the job's S3 objects.
#
# Replace before use (the script refuses to run with a placeholder left):
#   {{coordinator_url}}  the coordinator as the workers reach it, e.g.
#                        http://internal-nightshift-0123.elb.us-east-1.amazonaws.com:7070
#   {{token_parameter}}  the SSM Parameter Store SecureString holding the worker token, e.g.
#                        /nightshift/worker-token; or empty to use /etc/nightshift/token from
#                        the AMI instead
#
# The instance id, type and capacity type (spot or on-demand: the scaler falls back to
# on-demand when spot is short) are read here from the instance metadata service (IMDSv2) and
# passed on; the worker also polls it for the spot interruption notice and drains on one.
# A worker that exits is not restarted: a clean exit is a finished drain, and the scaler
# handles an instance whose worker went quiet (its --lost-after).
set -euo pipefail

COORDINATOR="{{coordinator_url}}"
TOKEN_PARAMETER="{{token_parameter}}"
ORT_LIB=/opt/venv/lib/python3.12/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1

for value in "$COORDINATOR" "$TOKEN_PARAMETER"; do
  case "$value" in
    *'{{'*) echo "nightshift user-data: replace the {{...}} placeholders first" >&2; exit 1 ;;
  esac
done

imds_token="$(curl -fsS --retry 5 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 21600' \
  http://169.254.169.254/latest/api/token)"
imds() {
  curl -fsS --retry 5 -H "X-aws-ec2-metadata-token: $imds_token" \
    "http://169.254.169.254/latest/meta-data/$1"
}
region="$(imds placement/region)"
instance_id="$(imds instance-id)"
instance_type="$(imds instance-type)"
capacity_type="$(imds instance-life-cycle)"   # "spot" or "on-demand"

# The worker token: from SSM Parameter Store, or from the AMI.
install -d -m 0755 /run/nightshift
umask 077
if [ -n "$TOKEN_PARAMETER" ]; then
  aws ssm get-parameter --region "$region" --name "$TOKEN_PARAMETER" --with-decryption \
    --query Parameter.Value --output text > /run/nightshift/token
else
  install -m 0400 /etc/nightshift/token /run/nightshift/token
fi
umask 022

# As the AMI's `nightshift` user when there is one ("$@" is empty otherwise, even for bash 4.2).
install -d -m 0755 /var/cache/nightshift
set --
if id nightshift >/dev/null 2>&1; then
  chown nightshift: /run/nightshift/token /var/cache/nightshift
  set -- runuser -u nightshift --
fi

exec "$@" /usr/local/bin/nightshift worker \
  --coordinator "$COORDINATOR" \
  --token-file /run/nightshift/token \
  --ort-lib "$ORT_LIB" \
  --instance-id "$instance_id" \
  --instance-type "$instance_type" \
  --capacity-type "$capacity_type" \
  --drain-timeout 90s \
  --cache-dir /var/cache/nightshift \
  --log-json

#!/bin/sh
# The `minio-init` one-shot of infra/compose.yaml (minio/mc image), run as root of MinIO once MinIO
# is healthy: creates the artifact bucket, and the MinIO user the MLflow server uses (MINIO_MLFLOW_USER)
# with a policy that reaches that bucket only. The root keys stay in this container and in MinIO's.
# Safe to rerun: the bucket is kept, the user's secret is reset, the policy rewritten.
#
# Environment: MINIO_ROOT_USER, MINIO_ROOT_PASSWORD, BUCKET, MINIO_MLFLOW_USER, MINIO_MLFLOW_PASSWORD.
# POSIX sh and builtins besides mc: the mc image has no grep or sed.
set -eu
policy=mlflow-artifacts-rw
policy_file=${TMPDIR:-/tmp}/$policy.json

mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "local/$BUCKET"

# The bucket and its objects, nothing else (no other bucket, no admin API).
printf '%s\n' '{"Version": "2012-10-17", "Statement": [' \
    '  {"Effect": "Allow",' \
    '   "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],' \
    "   \"Resource\": [\"arn:aws:s3:::$BUCKET\"]}," \
    '  {"Effect": "Allow",' \
    '   "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],' \
    "   \"Resource\": [\"arn:aws:s3:::$BUCKET/*\"]}" \
    ']}' >"$policy_file"
mc admin policy create local "$policy" "$policy_file"
mc admin user add local "$MINIO_MLFLOW_USER" "$MINIO_MLFLOW_PASSWORD"
# Older mc exits 1 when the policy is already attached (minio/mc#4670): accept that one case.
if ! mc admin policy attach local "$policy" --user "$MINIO_MLFLOW_USER"; then
    case $(mc admin user info local "$MINIO_MLFLOW_USER") in
        *"$policy"*) echo "policy $policy was already attached to $MINIO_MLFLOW_USER" ;;
        *) exit 1 ;;
    esac
fi

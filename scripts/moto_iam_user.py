"""Prepares a moto server started with INITIAL_NO_AUTH_ACTION_COUNT=3 (moto then checks every
later request's signature and IAM policy): its first three, unauthenticated, actions create an
IAM user, an access key and a policy that allows everything. Then, signed with that key, it
creates the buckets named. Prints the key id and its secret on one line.

    python scripts/moto_iam_user.py http://127.0.0.1:PORT [BUCKET ...]
"""

import json
import sys

import boto3


def main() -> None:
    endpoint, buckets = sys.argv[1], sys.argv[2:]
    region = "us-east-1"
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id="bootstrap",
        aws_secret_access_key="bootstrap",
    )
    iam.create_user(UserName="nightshift")
    key = iam.create_access_key(UserName="nightshift")["AccessKey"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
    }
    iam.put_user_policy(
        UserName="nightshift", PolicyName="everything", PolicyDocument=json.dumps(policy)
    )
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=key["AccessKeyId"],
        aws_secret_access_key=key["SecretAccessKey"],
    )
    for bucket in buckets:
        s3.create_bucket(Bucket=bucket)
    print(key["AccessKeyId"], key["SecretAccessKey"])


if __name__ == "__main__":
    main()

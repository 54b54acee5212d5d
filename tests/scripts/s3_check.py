"""What tests/object_store.rs asks of the local S3 server, through clients other than prefcap's.

    s3_check.py ENDPOINT create-twice BUCKET KEY    -> {"first": "ok", "second": "<error code>"}
    s3_check.py ENDPOINT inspect BUCKET PREFIX      -> {key: {"etag", "rows", "sha256", "bytes"}}
    s3_check.py ENDPOINT list BUCKET PREFIX         -> [key, ...]

`inspect` reads every Parquet object under PREFIX back with pyarrow's own S3 filesystem (rows)
and boto3 (ETag: a multipart upload's ends in -<parts>; sha256 of the bytes).
"""

import hashlib
import json
import sys

import boto3
import botocore.exceptions
import pyarrow.fs
import pyarrow.parquet as pq

endpoint, command, bucket = sys.argv[1], sys.argv[2], sys.argv[3]
client = boto3.client(
    "s3",
    endpoint_url=endpoint,
    aws_access_key_id="test",
    aws_secret_access_key="test",
    region_name="us-east-1",
)

if command == "create-twice":
    key = sys.argv[4]
    out = {}
    for attempt in ("first", "second"):
        try:
            client.put_object(Bucket=bucket, Key=key, Body=attempt.encode(), IfNoneMatch="*")
            out[attempt] = "ok"
        except botocore.exceptions.ClientError as e:
            out[attempt] = e.response["Error"]["Code"]
    out["body"] = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    print(json.dumps(out))
elif command == "inspect":
    prefix = sys.argv[4]
    host = endpoint.split("://", 1)[1]
    fs = pyarrow.fs.S3FileSystem(
        endpoint_override=host,
        scheme="http",
        access_key="test",
        secret_key="test",
        region="us-east-1",
    )
    out = {}
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if not key.endswith(".parquet"):
                continue
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            table = pq.read_table(f"{bucket}/{key}", filesystem=fs)
            out[key[len(prefix):].lstrip("/")] = {
                "etag": obj["ETag"].strip('"'),
                "rows": table.num_rows,
                "sha256": hashlib.sha256(body).hexdigest(),
                "bytes": len(body),
            }
    print(json.dumps(out))
elif command == "list":
    paginator = client.get_paginator("list_objects_v2")
    keys = [
        obj["Key"]
        for page in paginator.paginate(Bucket=bucket, Prefix=sys.argv[4])
        for obj in page.get("Contents", [])
    ]
    print(json.dumps(sorted(keys)))
else:
    sys.exit(f"unknown command {command}")

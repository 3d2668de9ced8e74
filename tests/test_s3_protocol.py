"""Pure tests of `mlrun.server.protocols.s3`: AWS's published SigV4 examples, URI encoding,
XML parsing (DOCTYPE refused) and the artifact key rules. No event loop, no server.

The vectors are the examples of the S3 API reference ("Signature Calculations for the
Authorization Header: Transferring Payload in a Single Chunk", "Authenticating Requests: Using
Query Parameters") and the IAM guide's signing-key derivation example.
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import unquote, urlsplit

import pytest

from mlrun.server import errors
from mlrun.server.protocols import s3

AWS = s3.Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
AWS_NOW = datetime(2013, 5, 24, 0, 0, 0, tzinfo=UTC)
HOST = "https://examplebucket.s3.amazonaws.com"
SCOPE = "AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request"


def _signature(headers: dict[str, str]) -> str:
    return headers["authorization"].rsplit("Signature=", 1)[1]


# --- SigV4: the published examples ---------------------------------------------------------------


def test_get_object_with_range_matches_the_aws_example() -> None:
    headers = s3.sign_request(
        method="GET",
        url=f"{HOST}/test.txt",
        headers={"Range": "bytes=0-9"},
        payload_sha256=s3.EMPTY_SHA256,
        credentials=AWS,
        now=AWS_NOW,
    )
    assert headers["authorization"] == (
        f"AWS4-HMAC-SHA256 Credential={SCOPE},"
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,"
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )
    assert headers["x-amz-date"] == "20130524T000000Z"
    assert headers["host"] == "examplebucket.s3.amazonaws.com"


def test_get_object_intermediate_values_match_the_aws_example() -> None:
    text, signed = s3.canonical_request(
        method="GET",
        path="/test.txt",
        query=[],
        headers={
            "host": "examplebucket.s3.amazonaws.com",
            "range": "bytes=0-9",
            "x-amz-content-sha256": s3.EMPTY_SHA256,
            "x-amz-date": "20130524T000000Z",
        },
        payload_sha256=s3.EMPTY_SHA256,
    )
    assert text == (
        "GET\n/test.txt\n\n"
        "host:examplebucket.s3.amazonaws.com\nrange:bytes=0-9\n"
        f"x-amz-content-sha256:{s3.EMPTY_SHA256}\nx-amz-date:20130524T000000Z\n\n"
        f"host;range;x-amz-content-sha256;x-amz-date\n{s3.EMPTY_SHA256}"
    )
    assert signed == "host;range;x-amz-content-sha256;x-amz-date"
    to_sign = s3.string_to_sign(
        timestamp="20130524T000000Z",
        scope=s3.credential_scope("20130524", "us-east-1"),
        canonical_request_text=text,
    )
    assert to_sign == (
        "AWS4-HMAC-SHA256\n20130524T000000Z\n20130524/us-east-1/s3/aws4_request\n"
        "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972"
    )


def test_put_object_matches_the_aws_example() -> None:
    body = b"Welcome to Amazon S3."
    payload = hashlib.sha256(body).hexdigest()
    assert payload == "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"
    headers = s3.sign_request(
        method="PUT",
        url=f"{HOST}/test%24file.text",
        headers={
            "Date": "Fri, 24 May 2013 00:00:00 GMT",
            "x-amz-storage-class": "REDUCED_REDUNDANCY",
        },
        payload_sha256=payload,
        credentials=AWS,
        now=AWS_NOW,
    )
    assert (
        "SignedHeaders=date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class,"
        in (headers["authorization"])
    )
    assert _signature(headers) == "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"


def test_put_object_signs_the_same_from_a_decoded_dollar_in_the_path() -> None:
    # `$` must be encoded as %24 in the canonical URI whether or not the wire URL encodes it.
    payload = hashlib.sha256(b"Welcome to Amazon S3.").hexdigest()
    common = {
        "method": "PUT",
        "headers": {
            "Date": "Fri, 24 May 2013 00:00:00 GMT",
            "x-amz-storage-class": "REDUCED_REDUNDANCY",
        },
        "payload_sha256": payload,
        "credentials": AWS,
        "now": AWS_NOW,
    }
    encoded = s3.sign_request(url=f"{HOST}/test%24file.text", **common)  # type: ignore[arg-type]
    literal = s3.sign_request(url=f"{HOST}/test$file.text", **common)  # type: ignore[arg-type]
    assert _signature(encoded) == _signature(literal)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("lifecycle", "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"),
        # Given out of order on purpose: the canonical query sorts it.
        ("prefix=J&max-keys=2", "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"),
    ],
)
def test_bucket_requests_match_the_aws_examples(query: str, expected: str) -> None:
    headers = s3.sign_request(
        method="GET",
        url=f"{HOST}/?{query}",
        headers={},
        payload_sha256=s3.EMPTY_SHA256,
        credentials=AWS,
        now=AWS_NOW,
    )
    assert _signature(headers) == expected


def test_presigned_get_matches_the_aws_example() -> None:
    url = s3.presign_url(
        method="GET", url=f"{HOST}/test.txt", credentials=AWS, now=AWS_NOW, expires_s=86400
    )
    assert url == (
        f"{HOST}/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
        "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
    )


def test_signing_key_matches_the_aws_derivation_example() -> None:
    key = s3.signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20150830", "us-east-1", "iam")
    assert key.hex() == "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"


@pytest.mark.parametrize(
    "change",
    ["secret", "method", "path", "expiry", "time", "region"],
)
def test_every_signed_input_changes_the_presigned_signature(change: str) -> None:
    kwargs = {
        "method": "GET",
        "url": f"{HOST}/test.txt",
        "credentials": AWS,
        "now": AWS_NOW,
        "expires_s": 86400,
    }
    other = dict(kwargs)
    if change == "secret":
        other["credentials"] = s3.Credentials(AWS.access_key, AWS.secret_key + "x")
    elif change == "method":
        other["method"] = "PUT"
    elif change == "path":
        other["url"] = f"{HOST}/test.txu"
    elif change == "expiry":
        other["expires_s"] = 86399
    elif change == "time":
        other["now"] = AWS_NOW + timedelta(seconds=1)
    elif change == "region":
        other["credentials"] = s3.Credentials(AWS.access_key, AWS.secret_key, "eu-west-1")

    def sig(url: str) -> str:
        return url.rsplit("X-Amz-Signature=", 1)[1]

    assert sig(s3.presign_url(**kwargs)) != sig(s3.presign_url(**other))  # type: ignore[arg-type]


def test_presigned_part_url_keeps_its_query_and_signs_it() -> None:
    url = s3.presign_url(
        method="PUT",
        url=s3.object_url(HOST, "bkt", "a b", [("partNumber", "3"), ("uploadId", "x/y+z")]),
        credentials=AWS,
        now=AWS_NOW,
        expires_s=60,
    )
    query = dict(item.split("=", 1) for item in urlsplit(url).query.split("&"))
    assert query["partNumber"] == "3"
    assert unquote(query["uploadId"]) == "x/y+z"
    assert query["uploadId"] == "x%2Fy%2Bz"
    assert urlsplit(url).path == "/bkt/a%20b"


def test_presign_refuses_bad_expiry_and_prior_auth_params() -> None:
    for expires_s in (0, -1, s3.MAX_PRESIGN_EXPIRES_S + 1):
        with pytest.raises(ValueError):
            s3.presign_url(
                method="GET", url=f"{HOST}/k", credentials=AWS, now=AWS_NOW, expires_s=expires_s
            )
    with pytest.raises(ValueError):
        s3.presign_url(
            method="GET",
            url=f"{HOST}/k?X-Amz-Date=1",
            credentials=AWS,
            now=AWS_NOW,
            expires_s=60,
        )


def test_timestamps_need_an_aware_datetime_and_are_rendered_in_utc() -> None:
    with pytest.raises(ValueError):
        s3.amz_date(datetime(2013, 5, 24))  # naive on purpose
    plus_two = timezone(timedelta(hours=2))
    assert s3.amz_date(datetime(2013, 5, 24, 2, 0, 0, tzinfo=plus_two)) == "20130524T000000Z"


def test_host_header_carries_a_non_default_port_only() -> None:
    def host(url: str) -> str:
        signed = s3.sign_request(
            method="GET", url=url, headers={}, payload_sha256="x", credentials=AWS, now=AWS_NOW
        )
        return signed["host"]

    assert host("http://127.0.0.1:9000/b") == "127.0.0.1:9000"
    assert host("http://Example.COM:80/b") == "example.com"
    assert host("https://example.com:443/b") == "example.com"
    assert host("http://[::1]:9000/b") == "[::1]:9000"


def test_header_values_are_trimmed_and_inner_spaces_collapsed() -> None:
    block, signed = s3.canonical_headers({"X-Amz-Meta-A": "  a   b  c ", "Host": "h"})
    assert block == "host:h\nx-amz-meta-a:a b c\n"
    assert signed == "host;x-amz-meta-a"


# --- URI encoding --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "encoded_slash", "kept_slash"),
    [
        ("test.txt", "test.txt", "test.txt"),
        ("AZaz09-._~", "AZaz09-._~", "AZaz09-._~"),
        ("a b", "a%20b", "a%20b"),
        ("a+b", "a%2Bb", "a%2Bb"),
        ("dir/file", "dir%2Ffile", "dir/file"),
        ("test$file.text", "test%24file.text", "test%24file.text"),
        ("100%", "100%25", "100%25"),
        ("!'()*", "%21%27%28%29%2A", "%21%27%28%29%2A"),
        ("ü", "%C3%BC", "%C3%BC"),
        ("日本/語", "%E6%97%A5%E6%9C%AC%2F%E8%AA%9E", "%E6%97%A5%E6%9C%AC/%E8%AA%9E"),
        ("😀", "%F0%9F%98%80", "%F0%9F%98%80"),
        ("=&?#", "%3D%26%3F%23", "%3D%26%3F%23"),
    ],
)
def test_uri_encode(text: str, encoded_slash: str, kept_slash: str) -> None:
    assert s3.uri_encode(text) == encoded_slash
    assert s3.uri_encode(text, encode_slash=False) == kept_slash
    assert unquote(kept_slash) == text


def test_canonical_query_sorts_encodes_and_keeps_empty_values() -> None:
    assert s3.canonical_query([("uploads", "")]) == "uploads="
    assert s3.canonical_query([("b", "2"), ("a", "x y"), ("a", "+")]) == "a=%2B&a=x%20y&b=2"
    assert s3.canonical_query([]) == ""


def test_canonical_uri_of_an_empty_path_is_a_slash() -> None:
    assert s3.canonical_uri("") == "/"
    assert s3.canonical_uri("/b/a b/c") == "/b/a%20b/c"


@pytest.mark.parametrize("key", ["plain", "a b/c d", "ü/日本語+%!(x)~'*.bin", "x%2Fy", "a+b=c&d"])
def test_object_url_is_already_canonical(key: str) -> None:
    url = s3.object_url("http://127.0.0.1:9000/", "bkt", key, [("uploadId", "a+b/c")])
    parts = urlsplit(url)
    assert parts.path == s3.canonical_uri(unquote(parts.path))
    assert unquote(parts.path) == f"/bkt/{key}"
    name, value = parts.query.split("=")
    assert s3.canonical_query([(unquote(name), unquote(value))]) == parts.query
    assert s3.object_url("http://h", "bkt", "k", [("uploads", "")]) == "http://h/bkt/k?uploads"


def test_a_literal_plus_in_a_query_is_not_a_space() -> None:
    # If `+` were decoded as a space, these two would sign alike and one would fail on S3.
    plus = s3.sign_request(
        method="GET",
        url=f"{HOST}/k?a=1+2",
        headers={},
        payload_sha256="x",
        credentials=AWS,
        now=AWS_NOW,
    )
    space = s3.sign_request(
        method="GET",
        url=f"{HOST}/k?a=1%202",
        headers={},
        payload_sha256="x",
        credentials=AWS,
        now=AWS_NOW,
    )
    assert _signature(plus) != _signature(space)


# --- XML -----------------------------------------------------------------------------------------


def test_parse_error_reads_code_and_message() -> None:
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<Error>\n  <Code>NoSuchBucket</Code>\n'
        b"  <Message>The specified bucket does not exist</Message>\n  <Resource>bkt</Resource>\n"
        b"  <RequestId>4442587FB7D0A2F9</RequestId>\n</Error>"
    )
    info = s3.parse_error(body)
    assert info == s3.S3ErrorInfo(
        code="NoSuchBucket",
        message="The specified bucket does not exist",
        resource="bkt",
        request_id="4442587FB7D0A2F9",
    )


def test_parse_error_ignores_success_documents_and_empty_bodies() -> None:
    assert s3.parse_error(b"") is None
    assert s3.parse_error(b"<ListAllMyBucketsResult/>") is None


def test_parse_initiate_multipart_with_and_without_namespace_and_result_suffix() -> None:
    aws = (
        b'<?xml version="1.0" encoding="UTF-8"?>'
        b'<InitiateMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        b"<Bucket>example-bucket</Bucket><Key>example-object</Key>"
        b"<UploadId>VXBsb2FkIElEIGZvciA2aWWpbmcncyBteS1tb3ZpZS5tMnRzIHVwbG9hZA</UploadId>"
        b"</InitiateMultipartUploadResult>"
    )
    assert s3.parse_initiate_multipart(aws) == (
        "VXBsb2FkIElEIGZvciA2aWWpbmcncyBteS1tb3ZpZS5tMnRzIHVwbG9hZA"
    )
    rclone = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<InitiateMultipartUpload>\n'
        b"  <Bucket>bkt</Bucket>\n  <Key>mp</Key>\n"
        b"  <UploadId>e55e964b-d9ad-4578-90dc-25e0df691fe6</UploadId>\n</InitiateMultipartUpload>"
    )
    assert s3.parse_initiate_multipart(rclone) == "e55e964b-d9ad-4578-90dc-25e0df691fe6"


@pytest.mark.parametrize(
    "body",
    [
        b"<Error><Code>AccessDenied</Code></Error>",
        b"<InitiateMultipartUploadResult><Bucket>b</Bucket></InitiateMultipartUploadResult>",
        b"not xml at all",
        b"<unclosed>",
    ],
)
def test_parse_initiate_multipart_refuses_what_it_cannot_use(body: bytes) -> None:
    with pytest.raises(s3.MalformedS3Response):
        s3.parse_initiate_multipart(body)


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<Error><Code>&lol3;</Code><Message>x</Message></Error>"""


@pytest.mark.parametrize(
    "body",
    [
        BILLION_LAUGHS,
        b'<!doctype Error SYSTEM "file:///etc/passwd"><Error><Code>x</Code></Error>',
        b"<?xml version='1.0'?><!  DOCTYPE x []><Error/>",
    ],
)
def test_documents_with_a_doctype_are_refused(body: bytes) -> None:
    with pytest.raises(s3.MalformedS3Response, match="DOCTYPE"):
        s3.parse_error(body)
    with pytest.raises(s3.MalformedS3Response):
        s3.parse_initiate_multipart(body)


def test_oversized_documents_are_refused() -> None:
    body = b"<Error><Message>" + b"x" * s3.MAX_XML_BYTES + b"</Message></Error>"
    with pytest.raises(s3.MalformedS3Response):
        s3.parse_error(body)


def test_parse_complete_multipart_reads_the_etag() -> None:
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<CompleteMultipartUploadResult>\n'
        b"  <Location></Location>\n  <Bucket>bkt</Bucket>\n  <Key>mp</Key>\n"
        b"  <ETag>&#34;0167b2441bbad6b151df8194e3a95d63-3&#34;</ETag>\n"
        b"</CompleteMultipartUploadResult>"
    )
    assert s3.parse_complete_multipart(body) == '"0167b2441bbad6b151df8194e3a95d63-3"'
    with pytest.raises(s3.MalformedS3Response):
        s3.parse_complete_multipart(b"<Error><Code>InvalidPart</Code></Error>")


def test_build_complete_multipart_orders_parts_and_escapes_etags() -> None:
    body = s3.build_complete_multipart([(2, '"b<&>"'), (1, '"a"'), (10, '"c"')])
    root = ET.fromstring(body)
    assert root.tag == f"{{{s3.S3_XML_NAMESPACE}}}CompleteMultipartUpload"
    ns = {"s3": s3.S3_XML_NAMESPACE}
    parts = [
        (int(p.findtext("s3:PartNumber", namespaces=ns) or 0), p.findtext("s3:ETag", namespaces=ns))
        for p in root.findall("s3:Part", ns)
    ]
    assert parts == [(1, '"a"'), (2, '"b<&>"'), (10, '"c"')]


@pytest.mark.parametrize(
    "parts",
    [[], [(1, '"a"'), (1, '"b"')], [(0, '"a"')], [(10_001, '"a"')], [(1, "")], [(1, '"a\n"')]],
)
def test_build_complete_multipart_refuses_bad_part_lists(parts: list[tuple[int, str]]) -> None:
    with pytest.raises(errors.InvalidInput) as caught:
        s3.build_complete_multipart(parts)
    assert caught.value.field == "parts"


# --- artifact keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "model.pt",
        "runs/0123/checkpoints/epoch-10.ckpt",
        "with space/and ü/日本語.bin",
        "dots..inside/.hidden/file.",
        "a" * 255,
        "/".join(["a" * 200] * 5),  # 1004 bytes
        "+%!(x)~'*$&=?#@",
    ],
)
def test_valid_keys_are_returned_unchanged(key: str) -> None:
    assert s3.validate_artifact_key(key) == key


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("", "empty"),
        ("../etc/passwd", "segment"),
        ("a/../../b", "segment"),
        ("a/./b", "segment"),
        ("..", "segment"),
        (".", "segment"),
        ("/etc/passwd", "absolute"),
        ("a//b", "segment"),
        ("a/", "segment"),
        ("a\\..\\b", "backslash"),
        ("C:\\x", "backslash"),
        ("nul\x00byte", "control"),
        ("new\nline", "control"),
        ("tab\there", "control"),
        ("del\x7f", "control"),
        ("c1\x85", "control"),
        ("a" * 256, "segment is longer"),
        ("/".join(["a" * 200] * 6), "longer than 1024"),
        ("ü" * 513, "longer than 1024"),
        ("lone\ud800surrogate", "Unicode"),
    ],
)
def test_invalid_keys_are_refused_with_field_name(key: str, why: str) -> None:
    with pytest.raises(errors.InvalidInput, match=why) as caught:
        s3.validate_artifact_key(key)
    assert caught.value.field == "name"
    assert caught.value.http_status == 400

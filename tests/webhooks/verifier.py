#!/usr/bin/env python3
"""A webhook receiver for outboxd's tests that verifies signatures with an
independent implementation: the `standardwebhooks` package from PyPI, the
Standard Webhooks specification's reference library for Python.

Listens on 127.0.0.1 (a free port) and prints one JSON object per line:
  {"ready": PORT}                                  once it accepts requests
  {"verified": true|false, "error": ..., "headers": {...}, "body": ...}
                                                   for each POST
It answers 200 with {"status": "1", ...} when a signature verifies with the
secret in --secret-file (read at each request, so a test can rotate it), and
{"status": "0", "message": <the verifier's reason>} when none does.
"""
import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

LOCK = threading.Lock()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--secret-file", required=True)
    args = ap.parse_args()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            with open(args.secret_file) as f:
                secret = f.read().strip()
            try:
                Webhook(secret).verify(body, headers)
                verified, error = True, None
            except WebhookVerificationError as e:
                verified, error = False, str(e)
            with LOCK:
                print(json.dumps({"verified": verified, "error": error,
                                  "headers": headers, "body": body.decode()}), flush=True)
            answer = ({"status": "1", "message": "signature verified"} if verified
                      else {"status": "0", "message": f"signature not verified: {error}"})
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(json.dumps({"ready": server.server_address[1]}), flush=True)
    # Stop when the test goes away and closes our stdin.
    threading.Thread(target=lambda: (sys.stdin.read(), server.shutdown()), daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()

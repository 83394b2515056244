"""A loopback sidecar for clients that speak only plain HTTP without credentials (rqdb).

It listens on 127.0.0.1 for plain HTTP and forwards each request to the Apiary node over
HTTPS (the cluster CA trusted, the hostname verified) with the user's basic-auth credentials
added, as a deployment would run stunnel or nginx beside such a client. Requests go out with
their target in absolute form (`POST https://127.0.0.1:PORT/db/request?... HTTP/1.1`), as a
proxy sends them: the node must accept that form (RFC 9112 §3.2.2). Answers come back as
they are.
"""

import base64
import http.client
import http.server
import ssl
import threading

# Hop-by-hop headers and the ones the sidecar sets itself.
_DROPPED = {"host", "authorization", "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade"}


class Sidecar:
    def __init__(self, upstream_port, ca_path, user, password):
        context = ssl.create_default_context(cafile=ca_path)
        authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        upstream = f"127.0.0.1:{upstream_port}"

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _DROPPED}
                headers["Authorization"] = authorization
                headers["Host"] = upstream
                connection = http.client.HTTPSConnection("127.0.0.1", upstream_port, context=context, timeout=60)
                try:
                    connection.request(self.command, f"https://{upstream}{self.path}", body=body, headers=headers)
                    answer = connection.getresponse()
                    payload = answer.read()
                finally:
                    connection.close()
                self.send_response(answer.status, answer.reason)
                for name, value in answer.getheaders():
                    if name.lower() not in _DROPPED and name.lower() != "content-length":
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_POST = do_HEAD = do_OPTIONS = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

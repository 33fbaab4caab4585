#!/usr/bin/env python3
"""A local SMTP sink for tests: accepts every message and writes it to a directory.

Usage: smtp_sink.py DIR. It listens on 127.0.0.1 on a free port, prints "port N" on its
first line of stdout, and writes each message received as DIR/<n>.eml with its envelope
(MAIL FROM, RCPT TO) as the first lines. Plain SMTP (no TLS, no AUTH): the lmbus test sends
with --smtp-tls none. Standard library only; stops when killed.
"""
import os
import socketserver
import sys
import threading

OUT = sys.argv[1]
counter = 0
lock = threading.Lock()


class Session(socketserver.StreamRequestHandler):
    def send(self, line):
        self.wfile.write((line + "\r\n").encode())
        self.wfile.flush()

    def handle(self):
        global counter
        self.send("220 lmbus-test-sink ESMTP")
        sender, recipients = None, []
        while True:
            raw = self.rfile.readline()
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            verb = line.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                self.send("250-lmbus-test-sink")
                self.send("250 8BITMIME")
            elif verb == "MAIL":
                sender, recipients = line[10:].strip(), []
                self.send("250 OK")
            elif verb == "RCPT":
                recipients.append(line[8:].strip())
                self.send("250 OK")
            elif verb == "DATA":
                self.send("354 end with <CRLF>.<CRLF>")
                body = []
                while True:
                    data = self.rfile.readline()
                    if not data or data in (b".\r\n", b".\n"):
                        break
                    if data.startswith(b".."):
                        data = data[1:]
                    body.append(data.decode("utf-8", "replace"))
                with lock:
                    counter += 1
                    name = os.path.join(OUT, "%d.eml" % counter)
                with open(name + ".tmp", "w") as f:
                    f.write("X-Envelope-From: %s\n" % sender)
                    f.write("X-Envelope-To: %s\n" % ", ".join(recipients))
                    f.write("".join(body))
                os.rename(name + ".tmp", name)
                self.send("250 OK queued")
            elif verb in ("RSET", "NOOP"):
                self.send("250 OK")
            elif verb == "QUIT":
                self.send("221 bye")
                return
            else:
                self.send("502 not implemented")


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


with Server(("127.0.0.1", 0), Session) as server:
    print("port %d" % server.server_address[1], flush=True)
    server.serve_forever()

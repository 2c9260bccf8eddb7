/*
 * benchtool: the compiled half of the rawproxy benchmarks (built on demand by
 * benchmarks/tools.py with gcc; see benchmarks/README.md).
 *
 *   benchtool serve     --port P [--cert F --key F]      the backend
 *   benchtool tunnel    --port P --mode up|down|both --bytes N [--tls]    W2 client
 *   benchtool pingpong  --port P --conns C --seconds S [--size 64] [--warmup W]   W3 client
 *   benchtool handshake --port P --inflight K --seconds S [--tls] [--warmup W]  W5 client
 *   benchtool relay     --port P --backend-port B [--mode copy|splice]   the reference row
 *
 * The backend is one epoll loop on one thread. A request without an Upgrade header gets a
 * fixed 200 response (keep-alive, pipelining fine). A request carrying Upgrade gets
 * 101 Switching Protocols and then, by path:
 *   /ws/echo (or anything else)  echo every byte back
 *   /ws/sink?bytes=N             read N bytes, then close
 *   /ws/source?bytes=N           send N random bytes, then close
 *   /ws/both?bytes=N             read N and send N at once, then close
 * so no workload relies on half-close (nginx, for one, ends a tunnel at the first FIN).
 *
 * Bulk bytes are sent in 4 MiB writes from a block of random bytes in memory and received
 * with MSG_TRUNC (discarded in the kernel, never copied to user space) on plain sockets:
 * the load side spends as little CPU per byte as loopback TCP allows, so DIRECT is the
 * physical limit of this machine. Clients print one JSON object on stdout. Built with
 * -DHAVE_TLS (OpenSSL) when the headers are there.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifdef HAVE_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>
#endif

#define RAND_SIZE (16u << 20)
#define PLAIN_CHUNK (4u << 20)
#define TLS_CHUNK (64u << 10)
#define HEAD_CAP 65536
#define ECHO_MAX (1u << 20)
#define WS_KEY "dGhlIHNhbXBsZSBub25jZQ=="
#define WS_ACCEPT "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" /* RFC 6455's example pair */

static const char RESPONSE_200[] = "HTTP/1.1 200 OK\r\n"
                                   "Content-Type: text/plain\r\n"
                                   "Content-Length: 13\r\n"
                                   "\r\n"
                                   "hello, world\n";
static const char RESPONSE_101[] = "HTTP/1.1 101 Switching Protocols\r\n"
                                   "Upgrade: websocket\r\n"
                                   "Connection: Upgrade\r\n"
                                   "Sec-WebSocket-Accept: " WS_ACCEPT "\r\n"
                                   "\r\n";

static char *rand_buf;
static char scratch[4u << 20];

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("benchtool: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void set_nonblock(int fd)
{
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static void set_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void make_random(void)
{
    rand_buf = malloc(RAND_SIZE);
    if (!rand_buf)
        die("out of memory");
    uint64_t x = 0x9E3779B97F4A7C15ull ^ (uint64_t)getpid() ^ now_ns();
    for (size_t i = 0; i < RAND_SIZE; i += 8) { /* xorshift64*: incompressible enough */
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        uint64_t v = x * 0x2545F4914F6CDD1Dull;
        memcpy(rand_buf + i, &v, 8);
    }
}

/* --- I/O over a plain or TLS socket --------------------------------------------------- */

enum { IO_AGAIN = -1, IO_ERR = -2 };

typedef struct {
    int fd;
    void *ssl;
} io_t;

#ifdef HAVE_TLS
static SSL_CTX *tls_server;
static SSL_CTX *tls_client;

static void tls_common(SSL_CTX *ctx)
{
    SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    /* No read-ahead: bytes OpenSSL pulled from the socket but has not decrypted would be
     * invisible to a level-triggered epoll, and the backend could wait for them forever. */
}

static void tls_server_init(const char *cert, const char *key)
{
    tls_server = SSL_CTX_new(TLS_server_method());
    tls_common(tls_server);
    if (SSL_CTX_use_certificate_chain_file(tls_server, cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(tls_server, key, SSL_FILETYPE_PEM) != 1)
        die("cannot load %s / %s", cert, key);
}

static void tls_client_init(void)
{
    /* No verification (every target is measured with the same client) and no session
     * cache: every connection is a full handshake, like a new browser. */
    tls_client = SSL_CTX_new(TLS_client_method());
    tls_common(tls_client);
    SSL_CTX_set_verify(tls_client, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(tls_client, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_alpn_protos(tls_client, (const unsigned char *)"\x08http/1.1", 9);
    /* A browser's preference order (AES-128-GCM first). */
    SSL_CTX_set_ciphersuites(tls_client, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:"
                                         "TLS_CHACHA20_POLY1305_SHA256");
}

static int tls_result(io_t *io, int r)
{
    int e = SSL_get_error(io->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
        return IO_AGAIN;
    if (e == SSL_ERROR_ZERO_RETURN)
        return 0;
    ERR_clear_error();
    return IO_ERR;
}
#endif

static int tls_enabled(void)
{
#ifdef HAVE_TLS
    return 1;
#else
    return 0;
#endif
}

static ssize_t io_read(io_t *io, void *buf, size_t n, int discard)
{
#ifdef HAVE_TLS
    if (io->ssl) {
        int r = SSL_read(io->ssl, buf, n > INT_MAX ? INT_MAX : (int)n);
        return r > 0 ? r : tls_result(io, r);
    }
#endif
    ssize_t r = recv(io->fd, discard ? NULL : buf, n, discard ? MSG_TRUNC : 0);
    if (r >= 0)
        return r;
    return (errno == EAGAIN || errno == EINTR) ? IO_AGAIN : IO_ERR;
}

static ssize_t io_write(io_t *io, const void *buf, size_t n)
{
#ifdef HAVE_TLS
    if (io->ssl) {
        int r = SSL_write(io->ssl, buf, n > INT_MAX ? INT_MAX : (int)n);
        return r > 0 ? r : tls_result(io, r);
    }
#endif
    ssize_t r = send(io->fd, buf, n, MSG_NOSIGNAL);
    if (r >= 0)
        return r;
    return (errno == EAGAIN || errno == EINTR) ? IO_AGAIN : IO_ERR;
}

/* Random bytes, from memory (send() from memory measured faster on loopback than sendfile()
 * from a memfd, whose 4 KiB page fragments make small skbs). */
static ssize_t io_source(io_t *io, uint64_t *offset, uint64_t left)
{
    size_t chunk = io->ssl ? TLS_CHUNK : PLAIN_CHUNK;
    if (left < chunk)
        chunk = (size_t)left;
    size_t off = (size_t)(*offset % (RAND_SIZE - PLAIN_CHUNK));
    ssize_t r = io_write(io, rand_buf + off, chunk);
    if (r > 0)
        *offset += (uint64_t)r;
    return r;
}

static void io_close(io_t *io)
{
#ifdef HAVE_TLS
    if (io->ssl) {
        SSL_shutdown(io->ssl);
        SSL_free(io->ssl);
        io->ssl = NULL;
    }
#endif
    if (io->fd >= 0)
        close(io->fd);
    io->fd = -1;
}

/* A blocking connection (TLS handshake done) for the clients that open few connections. */
static void io_connect(io_t *io, int port, int tls)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    io->ssl = NULL;
    io->fd = socket(AF_INET, SOCK_STREAM, 0);
    if (io->fd < 0 || connect(io->fd, (struct sockaddr *)&sa, sizeof sa) < 0)
        die("connect to port %d: %s", port, strerror(errno));
    set_nodelay(io->fd);
    if (!tls)
        return;
#ifdef HAVE_TLS
    SSL *ssl = SSL_new(tls_client);
    SSL_set_fd(ssl, io->fd);
    SSL_set_tlsext_host_name(ssl, "localhost");
    if (SSL_connect(ssl) != 1)
        die("TLS handshake with port %d failed", port);
    io->ssl = ssl;
#else
    die("built without TLS");
#endif
}

static int upgrade_request(char *buf, size_t cap, const char *path)
{
    return snprintf(buf, cap,
                    "GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
                    "Upgrade: websocket\r\nSec-WebSocket-Key: " WS_KEY "\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n",
                    path);
}

/* Send the upgrade request and read through the 101 head (blocking); returns how many
 * bytes past the head were read (left in buf). */
static size_t io_upgrade(io_t *io, const char *path, char *buf, size_t cap)
{
    char req[512];
    int len = upgrade_request(req, sizeof req, path);
    for (int done = 0; done < len;) {
        ssize_t n = io_write(io, req + done, (size_t)(len - done));
        if (n <= 0)
            die("sending the upgrade request failed");
        done += (int)n;
    }
    size_t have = 0;
    for (;;) {
        ssize_t n = io_read(io, buf + have, cap - have - 1, 0);
        if (n <= 0)
            die("no 101 from the target (read %zd after %zu bytes)", n, have);
        have += (size_t)n;
        buf[have] = 0;
        char *end = memmem(buf, have, "\r\n\r\n", 4);
        if (end) {
            if (strncmp(buf, "HTTP/1.1 101", 12) != 0)
                die("expected 101, got: %.80s", buf);
            size_t head = (size_t)(end + 4 - buf);
            memmove(buf, buf + head, have - head);
            return have - head;
        }
        if (have >= cap - 1)
            die("101 head too large");
    }
}

/* --- serve: the backend ----------------------------------------------------------------- */

enum { ST_HANDSHAKE, ST_HTTP, ST_TUNNEL };
enum { M_ECHO, M_SINK, M_SOURCE, M_BOTH };

struct bconn {
    io_t io;
    int state, mode, rd_eof;
    uint32_t events;
    char *in;
    size_t inlen;
    char *out;
    size_t outlen, outoff, outcap;
    uint64_t sink_left, src_left, src_off;
};

static int epfd;

static void out_append(struct bconn *c, const void *data, size_t n)
{
    if (c->outoff == c->outlen)
        c->outoff = c->outlen = 0;
    if (c->outlen + n > c->outcap) {
        size_t cap = c->outcap ? c->outcap : 4096;
        while (cap < c->outlen + n)
            cap *= 2;
        c->out = realloc(c->out, cap);
        if (!c->out)
            die("out of memory");
        c->outcap = cap;
    }
    memcpy(c->out + c->outlen, data, n);
    c->outlen += n;
}

static int is_upgrade(const char *head, size_t len)
{
    for (size_t i = 0; i + 10 < len; i++)
        if (head[i] == '\n' && strncasecmp(head + i + 1, "upgrade:", 8) == 0)
            return 1;
    return 0;
}

static void start_tunnel(struct bconn *c, const char *head)
{
    const char *path = strchr(head, ' ');
    path = path ? path + 1 : head;
    const char *bytes = strstr(path, "bytes=");
    uint64_t n = bytes ? strtoull(bytes + 6, NULL, 10) : 0;
    if (strncmp(path, "/ws/sink", 8) == 0) {
        c->mode = M_SINK;
        c->sink_left = n;
    } else if (strncmp(path, "/ws/source", 10) == 0) {
        c->mode = M_SOURCE;
        c->src_left = n;
    } else if (strncmp(path, "/ws/both", 8) == 0) {
        c->mode = M_BOTH;
        c->sink_left = c->src_left = n;
    } else {
        c->mode = M_ECHO;
    }
    c->src_off = (uint64_t)(((uintptr_t)c >> 4) % 4096) * 4096; /* vary where each starts */
    out_append(c, RESPONSE_101, sizeof RESPONSE_101 - 1);
    c->state = ST_TUNNEL;
}

/* Bytes that arrived in the tunnel (or right behind the upgrade request). */
static void tunnel_bytes(struct bconn *c, const char *data, size_t n)
{
    if (c->mode == M_ECHO) {
        out_append(c, data, n);
    } else if (c->mode == M_SINK || c->mode == M_BOTH) {
        c->sink_left -= n < c->sink_left ? n : c->sink_left;
    }
}

static void parse_heads(struct bconn *c)
{
    while (c->state == ST_HTTP) {
        char *end = memmem(c->in, c->inlen, "\r\n\r\n", 4);
        if (!end)
            return;
        size_t hlen = (size_t)(end + 4 - c->in);
        if (is_upgrade(c->in, hlen)) {
            c->in[hlen - 1] = 0;
            start_tunnel(c, c->in);
            tunnel_bytes(c, c->in + hlen, c->inlen - hlen);
            free(c->in);
            c->in = NULL;
            c->inlen = 0;
            return;
        }
        out_append(c, RESPONSE_200, sizeof RESPONSE_200 - 1);
        memmove(c->in, c->in + hlen, c->inlen - hlen);
        c->inlen -= hlen;
    }
}

static void bconn_close(struct bconn *c)
{
    io_close(&c->io);
    free(c->in);
    free(c->out);
    free(c);
}

/* Move everything that can move; returns 1 when the connection is finished. */
static int bconn_progress(struct bconn *c)
{
    /* A bounded number of rounds per event on plain sockets (what is left is still in the
     * kernel and epoll, level-triggered, reports it again); on TLS until nothing moves,
     * since bytes OpenSSL already holds are invisible to epoll. */
    for (int round = 0; c->io.ssl || round < 64; round++) {
        int did = 0;
        if (c->outoff < c->outlen) {
            ssize_t r = io_write(&c->io, c->out + c->outoff, c->outlen - c->outoff);
            if (r == IO_ERR)
                return 1;
            if (r > 0) {
                c->outoff += (size_t)r;
                did = 1;
            }
        }
        if (c->state == ST_TUNNEL && c->outoff == c->outlen && c->src_left > 0) {
            ssize_t r = io_source(&c->io, &c->src_off, c->src_left);
            if (r == IO_ERR)
                return 1;
            if (r > 0) {
                c->src_left -= (uint64_t)r;
                did = 1;
            }
        }
        int paused = c->outlen - c->outoff > ECHO_MAX;
        if (!c->rd_eof && !paused) {
            ssize_t r;
            if (c->state == ST_HTTP) {
                if (!c->in && !(c->in = malloc(HEAD_CAP)))
                    die("out of memory");
                if (c->inlen == HEAD_CAP)
                    return 1;
                r = io_read(&c->io, c->in + c->inlen, HEAD_CAP - c->inlen, 0);
                if (r > 0) {
                    c->inlen += (size_t)r;
                    parse_heads(c);
                }
            } else {
                int discard = c->mode != M_ECHO && !c->io.ssl;
                size_t want = c->mode == M_ECHO ? 65536 : sizeof scratch;
                r = io_read(&c->io, scratch, want, discard);
                if (r > 0)
                    tunnel_bytes(c, scratch, (size_t)r);
            }
            if (r == IO_ERR)
                return 1;
            if (r == 0)
                c->rd_eof = 1;
            if (r >= 0)
                did = 1;
        }
        int flushed = c->outoff == c->outlen;
        if (c->state == ST_TUNNEL && flushed) {
            if (c->mode == M_ECHO && c->rd_eof)
                return 1;
            if ((c->mode == M_SINK || c->mode == M_BOTH) && c->rd_eof && c->sink_left)
                return 1;
            if (c->sink_left == 0 && c->src_left == 0 && c->mode != M_ECHO)
                return 1;
        }
        if (c->state != ST_TUNNEL && c->rd_eof && flushed)
            return 1;
        if (!did)
            break;
    }
    uint32_t want = 0;
    if (!c->rd_eof && c->outlen - c->outoff <= ECHO_MAX)
        want |= EPOLLIN;
    if (c->outoff < c->outlen || (c->state == ST_TUNNEL && c->src_left > 0))
        want |= EPOLLOUT;
    if (want != c->events) {
        struct epoll_event ev = {.events = want, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->io.fd, &ev);
        c->events = want;
    }
    return 0;
}

static void bconn_event(struct bconn *c)
{
#ifdef HAVE_TLS
    if (c->state == ST_HANDSHAKE) {
        int r = SSL_do_handshake(c->io.ssl);
        if (r != 1) {
            int e = SSL_get_error(c->io.ssl, r);
            uint32_t want = e == SSL_ERROR_WANT_READ    ? EPOLLIN
                            : e == SSL_ERROR_WANT_WRITE ? EPOLLOUT
                                                        : 0;
            if (!want) {
                ERR_clear_error();
                bconn_close(c);
                return;
            }
            if (want != c->events) {
                struct epoll_event ev = {.events = want, .data.ptr = c};
                epoll_ctl(epfd, EPOLL_CTL_MOD, c->io.fd, &ev);
                c->events = want;
            }
            return;
        }
        c->state = ST_HTTP;
    }
#endif
    if (bconn_progress(c))
        bconn_close(c);
}

static int listen_on(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 4096) < 0)
        die("cannot listen on 127.0.0.1:%d: %s", port, strerror(errno));
    socklen_t len = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &len);
    printf("{\"port\": %d, \"tls_built\": %s}\n", ntohs(sa.sin_port),
           tls_enabled() ? "true" : "false");
    fflush(stdout);
    return fd;
}

static _Noreturn void cmd_serve(int port, const char *cert, const char *key)
{
    int tls = cert && key;
#ifdef HAVE_TLS
    if (tls)
        tls_server_init(cert, key);
#else
    if (tls)
        die("built without TLS");
#endif
    int lfd = listen_on(port);
    epfd = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev);
    static struct epoll_event evs[512];
    for (;;) {
        int n = epoll_wait(epfd, evs, 512, -1);
        if (n < 0 && errno != EINTR)
            die("epoll_wait: %s", strerror(errno));
        for (int i = 0; i < n; i++) {
            struct bconn *c = evs[i].data.ptr;
            if (c) {
                bconn_event(c);
                continue;
            }
            for (int k = 0; k < 256; k++) {
                int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
                if (fd < 0)
                    break;
                set_nodelay(fd);
                c = calloc(1, sizeof *c);
                if (!c)
                    die("out of memory");
                c->io.fd = fd;
                c->state = ST_HTTP;
#ifdef HAVE_TLS
                if (tls) {
                    c->io.ssl = SSL_new(tls_server);
                    SSL_set_fd(c->io.ssl, fd);
                    SSL_set_accept_state(c->io.ssl);
                    c->state = ST_HANDSHAKE;
                }
#endif
                c->events = EPOLLIN;
                struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &cev);
            }
        }
    }
}

/* --- tunnel: W2 ------------------------------------------------------------------------- */

static int cmd_tunnel(int port, const char *mode, uint64_t total, int tls)
{
    int up = strcmp(mode, "up") == 0, down = strcmp(mode, "down") == 0;
    int both = strcmp(mode, "both") == 0;
    if (!up && !down && !both)
        die("--mode is up, down or both");
    io_t io;
    io_connect(&io, port, tls);
    char path[128];
    snprintf(path, sizeof path, "/ws/%s?bytes=%llu", up ? "sink" : down ? "source" : "both",
             (unsigned long long)total);
    char head[16384];
    uint64_t received = io_upgrade(&io, path, head, sizeof head);
    uint64_t t0 = now_ns();
    set_nonblock(io.fd);
    uint64_t sent = 0, offset = 0;
    uint64_t to_send = up || both ? total : 0, to_receive = down || both ? total : 0;
    int eof = 0;
    const char *error = NULL;
    for (;;) {
        int done = sent >= to_send && (up ? eof : received >= to_receive);
        if (done)
            break;
        if (eof) {
            error = "the target closed early";
            break;
        }
        int moved = 0;
        if (sent < to_send) {
            ssize_t r = io_source(&io, &offset, to_send - sent);
            if (r == IO_ERR) {
                error = "send failed";
                break;
            }
            if (r > 0) {
                sent += (uint64_t)r;
                moved = 1;
            }
        }
        ssize_t r = io_read(&io, scratch, sizeof scratch, !tls);
        if (r == IO_ERR) {
            error = "receive failed";
            break;
        }
        if (r == 0)
            eof = 1;
        if (r > 0)
            received += (uint64_t)r;
        if (r >= 0)
            moved = 1;
#ifdef HAVE_TLS
        if (tls && SSL_has_pending(io.ssl))
            continue;
#endif
        if (!moved) {
            struct pollfd p = {.fd = io.fd, .events = POLLIN};
            if (sent < to_send)
                p.events |= POLLOUT;
            if (poll(&p, 1, 20000) == 0) {
                error = "stalled for 20 s";
                break;
            }
        }
    }
    double seconds = (double)(now_ns() - t0) / 1e9;
    io_close(&io);
    printf("{\"sent\": %llu, \"received\": %llu, \"seconds\": %.6f, \"error\": %s%s%s}\n",
           (unsigned long long)sent, (unsigned long long)received, seconds, error ? "\"" : "",
           error ? error : "null", error ? "\"" : "");
    return error ? 1 : 0;
}

/* --- latency records -------------------------------------------------------------------- */

struct samples {
    uint32_t *v; /* nanoseconds */
    size_t n, cap;
};

static void sample_add(struct samples *s, uint64_t ns)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 1u << 16;
        s->v = realloc(s->v, s->cap * sizeof *s->v);
        if (!s->v)
            die("out of memory");
    }
    s->v[s->n++] = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static double percentile_us(struct samples *s, double p)
{
    if (!s->n)
        return -1;
    size_t i = (size_t)(p / 100.0 * (double)(s->n - 1) + 0.5);
    return s->v[i] / 1000.0;
}

static void print_latency(struct samples *s)
{
    qsort(s->v, s->n, sizeof *s->v, cmp_u32);
    printf("\"p50_us\": %.2f, \"p99_us\": %.2f, \"p999_us\": %.2f, \"max_us\": %.2f",
           percentile_us(s, 50), percentile_us(s, 99), percentile_us(s, 99.9),
           percentile_us(s, 100));
}

/* --- pingpong: W3 ----------------------------------------------------------------------- */

static int cmd_pingpong(int port, int conns, double seconds, double warmup, int size)
{
    if (size < 1 || size > 4096)
        die("--size is 1..4096");
    io_t *io = calloc((size_t)conns, sizeof *io);
    uint64_t *sent_at = calloc((size_t)conns, sizeof *sent_at);
    int *got = calloc((size_t)conns, sizeof *got);
    char msg[4096], head[16384];
    memset(msg, 'x', sizeof msg);
    int ep = epoll_create1(0);
    for (int i = 0; i < conns; i++) {
        io_connect(&io[i], port, 0);
        if (io_upgrade(&io[i], "/ws/echo", head, sizeof head))
            die("unexpected bytes after the 101");
        set_nonblock(io[i].fd);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, io[i].fd, &ev);
    }
    uint64_t start = now_ns();
    uint64_t measure_from = start + (uint64_t)(warmup * 1e9);
    uint64_t end = measure_from + (uint64_t)(seconds * 1e9);
    for (int i = 0; i < conns; i++) {
        sent_at[i] = now_ns();
        if (io_write(&io[i], msg, (size_t)size) != size)
            die("short first send");
    }
    struct samples s = {0};
    uint64_t all = 0;
    const char *error = NULL;
    struct epoll_event evs[256];
    uint64_t now = now_ns();
    while (now < end && !error) {
        int n = epoll_wait(ep, evs, 256, 100);
        now = now_ns();
        for (int k = 0; k < n && !error; k++) {
            int i = (int)evs[k].data.u32;
            ssize_t r = io_read(&io[i], scratch, 65536, 0);
            if (r == IO_AGAIN)
                continue;
            if (r <= 0) {
                error = "a tunnel closed or failed";
                break;
            }
            got[i] += (int)r;
            if (got[i] > size) {
                error = "more bytes than sent";
                break;
            }
            if (got[i] < size)
                continue;
            now = now_ns();
            all++;
            if (sent_at[i] >= measure_from && now <= end)
                sample_add(&s, now - sent_at[i]);
            got[i] = 0;
            sent_at[i] = now;
            if (io_write(&io[i], msg, (size_t)size) != size)
                error = "short send";
        }
    }
    double measured = (double)((now < end ? now : end) - measure_from) / 1e9;
    printf("{\"round_trips\": %zu, \"all_round_trips\": %llu, \"seconds\": %.6f, "
           "\"rate\": %.1f, ",
           s.n, (unsigned long long)all, measured, measured > 0 ? (double)s.n / measured : 0.0);
    print_latency(&s);
    printf(", \"error\": %s%s%s}\n", error ? "\"" : "", error ? error : "null",
           error ? "\"" : "");
    for (int i = 0; i < conns; i++)
        io_close(&io[i]);
    return error ? 1 : 0;
}

/* --- handshake: W5 ---------------------------------------------------------------------- */

enum { H_CONNECTING, H_TLS, H_SEND, H_RECV };

struct hslot {
    io_t io;
    int state;
    uint64_t started;
    size_t have, sent;
    char buf[2048];
};

static char hs_request[512];
static int hs_request_len;

static void hs_want(int ep, struct hslot *h, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.ptr = h};
    epoll_ctl(ep, EPOLL_CTL_MOD, h->io.fd, &ev);
}

static int hs_start(int ep, struct hslot *h, int port)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    memset(&h->io, 0, sizeof h->io);
    h->io.fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (h->io.fd < 0)
        return -1;
    set_nodelay(h->io.fd);
    h->started = now_ns();
    h->have = h->sent = 0;
    h->state = H_CONNECTING;
    if (connect(h->io.fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
        close(h->io.fd);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = h};
    epoll_ctl(ep, EPOLL_CTL_ADD, h->io.fd, &ev);
    return 0;
}

/* Returns 1 when a handshake completed, -1 on failure, 0 to wait. */
static int hs_step(int ep, struct hslot *h, int tls)
{
    if (h->state == H_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(h->io.fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err)
            return -1;
        h->state = H_SEND;
#ifdef HAVE_TLS
        if (tls) {
            h->io.ssl = SSL_new(tls_client);
            SSL_set_fd(h->io.ssl, h->io.fd);
            SSL_set_tlsext_host_name(h->io.ssl, "localhost");
            SSL_set_connect_state(h->io.ssl);
            h->state = H_TLS;
        }
#else
        (void)tls;
#endif
    }
#ifdef HAVE_TLS
    if (h->state == H_TLS) {
        int r = SSL_do_handshake(h->io.ssl);
        if (r != 1) {
            int e = SSL_get_error(h->io.ssl, r);
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
                hs_want(ep, h, e == SSL_ERROR_WANT_READ ? EPOLLIN : EPOLLOUT);
                return 0;
            }
            ERR_clear_error();
            return -1;
        }
        h->state = H_SEND;
    }
#endif
    if (h->state == H_SEND) {
        while (h->sent < (size_t)hs_request_len) {
            ssize_t r = io_write(&h->io, hs_request + h->sent, (size_t)hs_request_len - h->sent);
            if (r == IO_AGAIN) {
                hs_want(ep, h, EPOLLOUT);
                return 0;
            }
            if (r <= 0)
                return -1;
            h->sent += (size_t)r;
        }
        h->state = H_RECV;
        hs_want(ep, h, EPOLLIN);
    }
    for (;;) {
        ssize_t r = io_read(&h->io, h->buf + h->have, sizeof h->buf - 1 - h->have, 0);
        if (r == IO_AGAIN)
            return 0;
        if (r <= 0)
            return -1;
        h->have += (size_t)r;
        h->buf[h->have] = 0;
        if (memmem(h->buf, h->have, "\r\n\r\n", 4))
            return strncmp(h->buf, "HTTP/1.1 101", 12) == 0 ? 1 : -1;
        if (h->have >= sizeof h->buf - 1)
            return -1;
    }
}

static int cmd_handshake(int port, int inflight, double seconds, double warmup, int tls)
{
    hs_request_len = upgrade_request(hs_request, sizeof hs_request, "/ws/echo");
    int ep = epoll_create1(0);
    struct hslot *slots = calloc((size_t)inflight, sizeof *slots);
    uint64_t start = now_ns();
    uint64_t measure_from = start + (uint64_t)(warmup * 1e9);
    uint64_t end = measure_from + (uint64_t)(seconds * 1e9);
    uint64_t done = 0, errors = 0, all = 0;
    struct samples s = {0};
    for (int i = 0; i < inflight; i++)
        if (hs_start(ep, &slots[i], port) < 0)
            errors++;
    struct epoll_event evs[256];
    uint64_t now = start;
    char first_error[160] = "";
    while (now < end) {
        int n = epoll_wait(ep, evs, 256, 100);
        now = now_ns();
        for (int k = 0; k < n; k++) {
            struct hslot *h = evs[k].data.ptr;
            int r = hs_step(ep, h, tls);
            if (r == 0)
                continue;
            now = now_ns();
            if (r > 0)
                all++;
            if (r > 0 && h->started >= measure_from && now <= end) {
                done++;
                sample_add(&s, now - h->started);
            } else if (r < 0) {
                errors++;
                if (!first_error[0])
                    snprintf(first_error, sizeof first_error, "state %d: %.100s", h->state,
                             h->have ? h->buf : strerror(errno));
            }
            epoll_ctl(ep, EPOLL_CTL_DEL, h->io.fd, NULL);
            io_close(&h->io);
            if (now < end && hs_start(ep, h, port) < 0)
                errors++;
        }
    }
    double measured = (double)(end - measure_from) / 1e9;
    printf("{\"handshakes\": %llu, \"all_handshakes\": %llu, \"errors\": %llu, "
           "\"seconds\": %.6f, \"rate\": %.1f, ",
           (unsigned long long)done, (unsigned long long)all, (unsigned long long)errors,
           measured, (double)done / measured);
    print_latency(&s);
    for (char *p = first_error; *p; p++)
        if (*p == '"' || *p == '\\' || (unsigned char)*p < 32)
            *p = ' ';
    printf(", \"first_error\": \"%s\"}\n", first_error);
    for (int i = 0; i < inflight; i++)
        if (slots[i].io.fd > 0)
            io_close(&slots[i].io);
    return 0;
}

/* --- relay: the reference row ----------------------------------------------------------- */
/*
 * A TCP relay with nothing of a proxy: no HTTP, no timeouts, no limits, no logging. It
 * copies bytes between each client and a connection it opens to the backend, in one epoll
 * loop (edge-triggered), and is there only to show what the fastest relay this machine runs
 * reaches in each workload: the ceiling of any proxy under the same placement.
 *   copy:   recv() and send() through 1 MiB buffers lent from a free list while bytes are
 *           in flight (the fastest relay measured here for W2);
 *   splice: splice() through 1 MiB pipes lent the same way (rawproxy's technique).
 */
#define RELAY_CHUNK (1u << 20)
#define RELAY_KEEP 64

struct rdir {
    int from, to;
    char *buf;
    size_t off, end;
    int pipe[2];
    size_t in_pipe;
    int eof, done;
};

struct relay {
    int fd[2];
    struct rdir d[2];
    struct relay *next_closed; /* freed after the batch of events that may still name it */
    int closed;
};

static int relay_splice;
static char *relay_free_bufs[RELAY_KEEP];
static int relay_free_buf_count;
static int relay_free_pipes[RELAY_KEEP][2];
static int relay_free_pipe_count;

static int relay_take(struct rdir *d)
{
    if (relay_splice) {
        if (relay_free_pipe_count) {
            relay_free_pipe_count--;
            d->pipe[0] = relay_free_pipes[relay_free_pipe_count][0];
            d->pipe[1] = relay_free_pipes[relay_free_pipe_count][1];
            return 0;
        }
        if (pipe2(d->pipe, O_NONBLOCK | O_CLOEXEC) < 0)
            return -1;
        fcntl(d->pipe[1], F_SETPIPE_SZ, RELAY_CHUNK);
        return 0;
    }
    d->buf = relay_free_buf_count ? relay_free_bufs[--relay_free_buf_count] : malloc(RELAY_CHUNK);
    return d->buf ? 0 : -1;
}

static void relay_give_back(struct rdir *d)
{
    if (relay_splice) {
        if (d->pipe[0] < 0)
            return;
        if (d->in_pipe == 0 && relay_free_pipe_count < RELAY_KEEP) {
            relay_free_pipes[relay_free_pipe_count][0] = d->pipe[0];
            relay_free_pipes[relay_free_pipe_count][1] = d->pipe[1];
            relay_free_pipe_count++;
        } else {
            close(d->pipe[0]);
            close(d->pipe[1]);
        }
        d->pipe[0] = d->pipe[1] = -1;
        return;
    }
    if (!d->buf)
        return;
    if (relay_free_buf_count < RELAY_KEEP)
        relay_free_bufs[relay_free_buf_count++] = d->buf;
    else
        free(d->buf);
    d->buf = NULL;
}

/* Move what can be moved now; -1 on an error of either socket. */
static int relay_pump(struct rdir *d)
{
    for (;;) {
        if (relay_splice) {
            while (d->in_pipe) {
                ssize_t n = splice(d->pipe[0], NULL, d->to, NULL, d->in_pipe,
                                   SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
                if (n < 0)
                    return errno == EAGAIN ? 0 : -1;
                d->in_pipe -= (size_t)n;
            }
        } else {
            while (d->off < d->end) {
                ssize_t n = send(d->to, d->buf + d->off, d->end - d->off,
                                 MSG_DONTWAIT | MSG_NOSIGNAL);
                if (n < 0)
                    return errno == EAGAIN ? 0 : -1;
                d->off += (size_t)n;
            }
            d->off = d->end = 0;
        }
        if (d->eof) {
            relay_give_back(d);
            if (!d->done) {
                shutdown(d->to, SHUT_WR);
                d->done = 1;
            }
            return 0;
        }
        if ((relay_splice ? d->pipe[0] < 0 : !d->buf) && relay_take(d) < 0)
            return -1;
        ssize_t n = relay_splice ? splice(d->from, NULL, d->pipe[1], NULL, RELAY_CHUNK,
                                          SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
                                 : recv(d->from, d->buf, RELAY_CHUNK, MSG_DONTWAIT);
        if (n < 0) {
            if (errno != EAGAIN)
                return -1;
            relay_give_back(d); /* empty: an idle direction holds nothing */
            return 0;
        }
        if (n == 0)
            d->eof = 1;
        else if (relay_splice)
            d->in_pipe = (size_t)n;
        else
            d->end = (size_t)n;
    }
}

static struct relay *relay_closed;

static void relay_close(struct relay *r)
{
    for (int i = 0; i < 2; i++) {
        r->d[i].in_pipe = 1; /* whatever is left in a pipe is dropped with it */
        relay_give_back(&r->d[i]);
        close(r->fd[i]);
    }
    r->closed = 1;
    r->next_closed = relay_closed;
    relay_closed = r;
}

static void relay_event(struct relay *r, uint32_t events)
{
    if (r->closed)
        return;
    if (events & EPOLLERR) {
        relay_close(r);
        return;
    }
    if (relay_pump(&r->d[0]) < 0 || relay_pump(&r->d[1]) < 0 || (r->d[0].done && r->d[1].done))
        relay_close(r);
}

static _Noreturn void cmd_relay(int port, int backend_port, const char *mode)
{
    if (!backend_port)
        die("--backend-port is required");
    if (strcmp(mode, "splice") == 0)
        relay_splice = 1;
    else if (strcmp(mode, "copy") != 0)
        die("--mode is copy or splice");
    struct sockaddr_in backend = {.sin_family = AF_INET, .sin_port = htons((uint16_t)backend_port)};
    backend.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int lfd = listen_on(port);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    static struct epoll_event evs[512];
    for (;;) {
        int n = epoll_wait(ep, evs, 512, -1);
        if (n < 0 && errno != EINTR)
            die("epoll_wait: %s", strerror(errno));
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr) {
                relay_event(evs[i].data.ptr, evs[i].events);
                continue;
            }
            for (int k = 0; k < 256; k++) {
                int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (c < 0)
                    break;
                int b = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
                if (b < 0 || (connect(b, (struct sockaddr *)&backend, sizeof backend) < 0 &&
                              errno != EINPROGRESS)) {
                    close(c);
                    if (b >= 0)
                        close(b);
                    continue;
                }
                set_nodelay(c);
                set_nodelay(b);
                struct relay *r = calloc(1, sizeof *r);
                if (!r)
                    die("out of memory");
                r->fd[0] = c;
                r->fd[1] = b;
                r->d[0] = (struct rdir){.from = c, .to = b, .pipe = {-1, -1}};
                r->d[1] = (struct rdir){.from = b, .to = c, .pipe = {-1, -1}};
                struct epoll_event rev = {
                    .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = r};
                epoll_ctl(ep, EPOLL_CTL_ADD, c, &rev);
                epoll_ctl(ep, EPOLL_CTL_ADD, b, &rev);
            }
        }
        while (relay_closed) {
            struct relay *r = relay_closed;
            relay_closed = r->next_closed;
            free(r);
        }
    }
}

/* --- command line ----------------------------------------------------------------------- */

static const char *opt(int argc, char **argv, const char *name, const char *fallback)
{
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], name) == 0) {
            if (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0)
                return argv[i + 1];
            return "1";
        }
    }
    return fallback;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        die("usage: benchtool serve|tunnel|pingpong|handshake|relay [options] (see the source)");
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    make_random();
    const char *cmd = argv[1];
    int port = atoi(opt(argc, argv, "--port", "0"));
    int tls = opt(argc, argv, "--tls", NULL) != NULL;
#ifdef HAVE_TLS
    if (tls)
        tls_client_init();
#else
    if (tls)
        die("built without TLS");
#endif
    if (strcmp(cmd, "version") == 0) {
        printf("{\"tls\": %s}\n", tls_enabled() ? "true" : "false");
        return 0;
    }
    if (strcmp(cmd, "serve") == 0)
        cmd_serve(port, opt(argc, argv, "--cert", NULL), opt(argc, argv, "--key", NULL));
    if (strcmp(cmd, "relay") == 0)
        cmd_relay(port, atoi(opt(argc, argv, "--backend-port", "0")),
                  opt(argc, argv, "--mode", "copy"));
    if (!port)
        die("--port is required");
    if (strcmp(cmd, "tunnel") == 0)
        return cmd_tunnel(port, opt(argc, argv, "--mode", "up"),
                          strtoull(opt(argc, argv, "--bytes", "1073741824"), NULL, 10), tls);
    if (strcmp(cmd, "pingpong") == 0)
        return cmd_pingpong(port, atoi(opt(argc, argv, "--conns", "1")),
                            atof(opt(argc, argv, "--seconds", "3")),
                            atof(opt(argc, argv, "--warmup", "0.3")),
                            atoi(opt(argc, argv, "--size", "64")));
    if (strcmp(cmd, "handshake") == 0)
        return cmd_handshake(port, atoi(opt(argc, argv, "--inflight", "50")),
                             atof(opt(argc, argv, "--seconds", "3")),
                             atof(opt(argc, argv, "--warmup", "0.3")), tls);
    die("unknown command %s", cmd);
}

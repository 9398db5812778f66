/* Guest side of the vsock scenario (built static by the test harness with the host's gcc).
 *   vsock-echo server PORT N         accept one connection, echo N messages back
 *   vsock-echo client CID PORT N     connect, send N numbered messages, check each echo
 * Messages are MSG bytes: "seq=<n>" padded with a byte pattern that depends on n, so a lost,
 * duplicated or reordered message is caught. Prints "VSOCK <role> OK <n>" or "VSOCK <role>
 * FAIL <why>" and exits 0 or 1. */
#include <sys/socket.h> /* before linux/vm_sockets.h, which needs struct sockaddr */
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MSG 64

static void fill(char *m, unsigned n) {
    memset(m, 0, MSG);
    snprintf(m, MSG, "seq=%u", n);
    for (int i = 16; i < MSG; i++) m[i] = (char)(n * 31 + i);
}

static int full(int fd, char *b, int len, int wr) {
    int done = 0;
    while (done < len) {
        int r = wr ? write(fd, b + done, len - done) : read(fd, b + done, len - done);
        if (r <= 0) return -1;
        done += r;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage\n"); return 2; }
    int server = strcmp(argv[1], "server") == 0;
    const char *role = server ? "server" : "client";
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0) { printf("VSOCK %s FAIL socket\n", role); return 1; }
    struct sockaddr_vm a = { .svm_family = AF_VSOCK };
    unsigned n;
    if (server) {
        a.svm_cid = VMADDR_CID_ANY; a.svm_port = atoi(argv[2]); n = atoi(argv[3]);
        if (bind(fd, (void *)&a, sizeof a) || listen(fd, 1)) { printf("VSOCK server FAIL bind\n"); return 1; }
        printf("VSOCK server LISTENING\n"); fflush(stdout);
        int c = accept(fd, 0, 0);
        if (c < 0) { printf("VSOCK server FAIL accept\n"); return 1; }
        char m[MSG];
        for (unsigned i = 0; i < n; i++) {
            if (full(c, m, MSG, 0) || full(c, m, MSG, 1)) { printf("VSOCK server FAIL at %u\n", i); return 1; }
        }
        printf("VSOCK server OK %u\n", n);
        close(c);
    } else {
        a.svm_cid = atoi(argv[2]); a.svm_port = atoi(argv[3]); n = atoi(argv[4]);
        if (connect(fd, (void *)&a, sizeof a)) { printf("VSOCK client FAIL connect\n"); return 1; }
        char m[MSG], e[MSG];
        for (unsigned i = 0; i < n; i++) {
            fill(m, i);
            if (full(fd, m, MSG, 1) || full(fd, e, MSG, 0)) { printf("VSOCK client FAIL io at %u\n", i); return 1; }
            if (memcmp(m, e, MSG)) { printf("VSOCK client FAIL mismatch at %u\n", i); return 1; }
        }
        printf("VSOCK client OK %u\n", n);
    }
    close(fd);
    return 0;
}

/* uvirtio-pmem-c: uvirtio's virtio-pmem C API used from a C program.
 *
 *   uvirtio-pmem-c BDF OFFSET TEXT
 *
 * Copies TEXT to OFFSET of the device's range, persists it with
 * uvirtio_pmem_persist_async() (waiting for the callback), flushes once more
 * and prints the driver's counters. Exit 0 on success, 1 when the device
 * fails, 2 on bad input (nothing written). Also an example: everything here
 * is plain C99 against uvirtio/pmem.h. */
#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "uvirtio/pmem.h"

static const char *prog = "uvirtio-pmem-c";

/* What the persist_async callback hands back to main(). */
struct completion {
  pthread_mutex_t mutex;
  pthread_cond_t cond;
  int done;
  int result;
  char message[512];
};

static void on_persisted(int result, const char *message, void *ctx) {
  struct completion *c = ctx;
  pthread_mutex_lock(&c->mutex);
  c->result = result;
  snprintf(c->message, sizeof c->message, "%s", message);
  c->done = 1;
  pthread_cond_signal(&c->cond);
  pthread_mutex_unlock(&c->mutex);
}

static int usage(void) {
  fprintf(stderr, "usage: %s BDF OFFSET TEXT\n", prog);
  return 2;
}

/* A non-negative decimal or 0x-hex integer, entirely: not strtoull's base
 * 0, which would read "010" as octal 8, nor its leading blanks and signs. */
static int parse_offset(const char *s, uint64_t *out) {
  char *end = NULL;
  unsigned long long v;
  const int hex = s[0] == '0' && (s[1] == 'x' || s[1] == 'X');
  const char *digits = hex ? s + 2 : s;
  if (!(hex ? isxdigit((unsigned char)digits[0]) : isdigit((unsigned char)digits[0]))) return -1;
  errno = 0;
  v = strtoull(digits, &end, hex ? 16 : 10);
  if (errno != 0 || *end != '\0') return -1;
  *out = v;
  return 0;
}

int main(int argc, char **argv) {
  uvirtio_pmem_options opts;
  uvirtio_pmem_stats stats;
  uvirtio_pmem *pm = NULL;
  struct completion done;
  char err[512];
  uint64_t offset = 0, size;
  size_t len;
  int rc;

  if (argc == 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
    printf(
        "usage: %s BDF OFFSET TEXT\n"
        "Copies TEXT to OFFSET (decimal or 0x hex) of the virtio-pmem range of BDF and\n"
        "persists it through the C API (uvirtio/pmem.h).\n",
        prog);
    return 0;
  }
  if (argc != 4) return usage();
  if (parse_offset(argv[2], &offset) != 0) {
    fprintf(stderr, "%s: OFFSET '%s' is not a non-negative integer\n", prog, argv[2]);
    return 2;
  }
  len = strlen(argv[3]);
  if (len == 0) {
    fprintf(stderr, "%s: TEXT is empty: nothing to write\n", prog);
    return 2;
  }

  uvirtio_pmem_options_init(&opts);
  opts.recover_on_reset = 1; /* a flush is idempotent: resend it after a reset */
  rc = uvirtio_pmem_open_opts(argv[1], &opts, &pm, err, sizeof err);
  if (rc != 0) {
    fprintf(stderr, "%s: %s\n", prog, err);
    return rc == -EINVAL ? 2 : 1;
  }
  size = uvirtio_pmem_size(pm);
  if (offset > size || len > size - offset) {
    fprintf(stderr, "%s: %s: %zu bytes at offset %llu do not fit the %llu-byte range; nothing written\n",
            prog, argv[1], len, (unsigned long long)offset, (unsigned long long)size);
    uvirtio_pmem_close(pm);
    return 2;
  }

  memcpy((char *)uvirtio_pmem_data(pm) + offset, argv[3], len);
  memset(&done, 0, sizeof done);
  pthread_mutex_init(&done.mutex, NULL);
  pthread_cond_init(&done.cond, NULL);
  rc = uvirtio_pmem_persist_async(pm, (char *)uvirtio_pmem_data(pm) + offset, len, on_persisted, &done);
  if (rc == 0) {
    pthread_mutex_lock(&done.mutex);
    while (!done.done) pthread_cond_wait(&done.cond, &done.mutex);
    pthread_mutex_unlock(&done.mutex);
    rc = done.result;
    if (rc != 0) fprintf(stderr, "%s: %s\n", prog, done.message);
  } else {
    fprintf(stderr, "%s: %s\n", prog, uvirtio_pmem_last_error(pm));
  }
  if (rc == 0 && (rc = uvirtio_pmem_flush(pm)) != 0)
    fprintf(stderr, "%s: %s\n", prog, uvirtio_pmem_last_error(pm));
  if (rc == 0) {
    uvirtio_pmem_get_stats(pm, &stats);
    printf(
        "%s: wrote %zu bytes at offset %llu, persisted (async) and flushed; persist_calls=%llu "
        "device_flushes=%llu recoveries=%llu\n",
        argv[1], len, (unsigned long long)offset, (unsigned long long)stats.persist_calls,
        (unsigned long long)stats.device_flushes, (unsigned long long)stats.recoveries);
  }
  uvirtio_pmem_close(pm);
  pthread_cond_destroy(&done.cond);
  pthread_mutex_destroy(&done.mutex);
  return rc == 0 ? 0 : 1;
}

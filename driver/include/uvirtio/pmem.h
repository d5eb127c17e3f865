/* uvirtio virtio-pmem: the C API.
 *
 * A thin layer over uvirtio::driver::Pmem for C programs. Calls return 0 on
 * success or a negative errno value: -EIO when the host failed to fsync the
 * backing file or the device is broken, -ERESTART when the device set
 * DEVICE_NEEDS_RESET or completed a request from before a reset on a packed
 * ring (uvirtio_pmem_recover() brings it back), -EINVAL for a range outside
 * the mapping, -ETIMEDOUT when the device did not answer in time, and an
 * OS call's own errno when one failed (-ENOMEM, -EMFILE, ...). The
 * message of the last failure (naming the device, the operation and the
 * cause) is kept per handle and thread. Every call is thread-safe.
 *
 *   uvirtio_pmem *pm;
 *   char err[256];
 *   if (uvirtio_pmem_open("0000:01:00.0", &pm, err, sizeof err) != 0) { puts(err); return 1; }
 *   memcpy(uvirtio_pmem_data(pm), "hello", 5);
 *   if (uvirtio_pmem_persist(pm, uvirtio_pmem_data(pm), 5) != 0) puts(uvirtio_pmem_last_error(pm));
 *   uvirtio_pmem_close(pm);
 */
#ifndef UVIRTIO_PMEM_H
#define UVIRTIO_PMEM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct uvirtio_pmem uvirtio_pmem;

/* How device flushes complete (uvirtio_pmem_options.completion). */
enum {
  UVIRTIO_PMEM_HYBRID = 0,    /* spin briefly, then sleep on the interrupt (default) */
  UVIRTIO_PMEM_INTERRUPT = 1, /* sleep on the interrupt at once */
  UVIRTIO_PMEM_POLL = 2       /* spin until the device answers */
};

/* Options for uvirtio_pmem_open_opts(). Fill with uvirtio_pmem_options_init()
 * first, then change what you need: `size` lets later versions add fields. */
typedef struct uvirtio_pmem_options {
  size_t size;          /* sizeof(uvirtio_pmem_options), set by _init */
  int completion;       /* UVIRTIO_PMEM_HYBRID, _INTERRUPT or _POLL */
  uint32_t timeout_ms;  /* deadline of each device flush (default 10000; > 0) */
  int recover_on_reset; /* nonzero: when the device needs a reset during a
                         * flush, reset it and flush again instead of
                         * returning -ERESTART (default 0) */
  uint32_t gather_us;   /* group commit: how long the next flush may wait
                         * for callers a flush covered (default 500; 0: off) */
} uvirtio_pmem_options;

void uvirtio_pmem_options_init(uvirtio_pmem_options *opts);

/* Opens the virtio-pmem function at `bdf` (bound to vfio-pci) and maps its
 * range. On failure writes a message to err (if errlen > 0). */
int uvirtio_pmem_open(const char *bdf, uvirtio_pmem **out, char *err, size_t errlen);
/* The same with options (NULL: the defaults); -EINVAL for a bad option. */
int uvirtio_pmem_open_opts(const char *bdf, const uvirtio_pmem_options *opts, uvirtio_pmem **out, char *err,
                           size_t errlen);
void uvirtio_pmem_close(uvirtio_pmem *pm);
/* Every call below given a NULL handle returns -EINVAL (uvirtio_pmem_data
 * NULL, uvirtio_pmem_size 0, uvirtio_pmem_get_stats zeros); close(NULL)
 * does nothing. */

void *uvirtio_pmem_data(uvirtio_pmem *pm);
uint64_t uvirtio_pmem_size(const uvirtio_pmem *pm);

/* Cache write-back of [addr, addr+len) plus a coalesced device flush. */
int uvirtio_pmem_persist(uvirtio_pmem *pm, const void *addr, size_t len);
/* A coalesced device flush only. */
int uvirtio_pmem_flush(uvirtio_pmem *pm);
int uvirtio_pmem_memcpy_persist(uvirtio_pmem *pm, void *dst, const void *src, size_t n);

/* persist() without waiting. Returns 0 when the request is queued (then
 * `done` runs exactly once with the result as above and, on failure, its
 * message, valid during the call only), or a negative errno without calling
 * `done` (a range outside the mapping). `done` runs on the thread that
 * completed the covering flush: a thread of the library, or the thread of
 * one of your own persist/flush calls that was issuing it, so do not hold a
 * lock around persist/flush that `done` takes. Keep `done` short; it may
 * call persist_async, but persist or flush from it fail with -EINVAL (they
 * could wait for a flush only that thread can issue), and it must not close
 * the handle. uvirtio_pmem_close() returns after every callback ran, with
 * the range still mapped while they run: those whose flush had not started
 * get -EIO ("closed before the flush was issued"). */
typedef void (*uvirtio_pmem_done_fn)(int result, const char *message, void *ctx);
int uvirtio_pmem_persist_async(uvirtio_pmem *pm, const void *addr, size_t len, uvirtio_pmem_done_fn done,
                               void *ctx);
/* After a persist or flush failed with -EIO (the host's fsync failed), a
 * later successful flush does not make the writes made before it durable:
 * the host may have marked their pages clean. This stores to every page of
 * [addr, addr+len) again (an atomic no-op) so the host writes them back, and
 * persists the range. */
int uvirtio_pmem_repersist(uvirtio_pmem *pm, const void *addr, size_t len);
/* After an error of -ERESTART (the device needs a reset): resets
 * the device and brings it back with the same features and queue. Returns
 * how many flush requests the device dropped (>= 0; a persist that failed
 * must be repeated), or a negative errno. The mapped data is untouched. */
int uvirtio_pmem_recover(uvirtio_pmem *pm);
/* Orders cache write-backs issued so far (SFENCE). */
void uvirtio_pmem_drain(void);

/* Counters since open: persist/flush calls, device flushes they caused, and
 * device resets by recover() or recover_on_reset. */
typedef struct uvirtio_pmem_stats {
  uint64_t persist_calls;
  uint64_t device_flushes;
  uint64_t recoveries;
} uvirtio_pmem_stats;
void uvirtio_pmem_get_stats(const uvirtio_pmem *pm, uvirtio_pmem_stats *out);

/* The message of the calling thread's last failed call on this handle ("" if
 * none); valid until that thread's next failed call on it, or the close.
 * Threads may share a handle: each sees its own failures. */
const char *uvirtio_pmem_last_error(const uvirtio_pmem *pm);

#ifdef __cplusplus
}
#endif

#endif /* UVIRTIO_PMEM_H */

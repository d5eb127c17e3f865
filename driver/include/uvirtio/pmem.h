/* uvirtio virtio-pmem: the C API.
 *
 * A thin layer over uvirtio::driver::Pmem for C programs. Calls return 0 on
 * success or a negative errno value: -EIO when the host failed to fsync the
 * backing file or the device is broken, -ERESTART when the device set
 * DEVICE_NEEDS_RESET or completed a request from before a reset on a packed
 * ring (uvirtio_pmem_recover() brings it back), -EINVAL for a range outside
 * the mapping, -ETIMEDOUT when the device did not answer in time. The
 * message of the last failure (naming the device, the operation and the
 * cause) is kept per handle.
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

/* Opens the virtio-pmem function at `bdf` (bound to vfio-pci) and maps its
 * range. On failure writes a message to err (if errlen > 0). */
int uvirtio_pmem_open(const char *bdf, uvirtio_pmem **out, char *err, size_t errlen);
void uvirtio_pmem_close(uvirtio_pmem *pm);

void *uvirtio_pmem_data(uvirtio_pmem *pm);
uint64_t uvirtio_pmem_size(const uvirtio_pmem *pm);

/* Cache write-back of [addr, addr+len) plus a coalesced device flush. */
int uvirtio_pmem_persist(uvirtio_pmem *pm, const void *addr, size_t len);
/* A coalesced device flush only. */
int uvirtio_pmem_flush(uvirtio_pmem *pm);
int uvirtio_pmem_memcpy_persist(uvirtio_pmem *pm, void *dst, const void *src, size_t n);
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

const char *uvirtio_pmem_last_error(const uvirtio_pmem *pm);

#ifdef __cplusplus
}
#endif

#endif /* UVIRTIO_PMEM_H */

/* Shared between the guest kernel and the host-side verifier. */
#ifndef FERRY_GUEST_LAYOUT_H
#define FERRY_GUEST_LAYOUT_H

#define FERRY_GUEST_WS_BASE 0x01000000u /* guest-physical start of the working set */
#define FERRY_GUEST_PAGE 4096u
#define FERRY_GUEST_WORDS (FERRY_GUEST_PAGE / 4u)

/* Word 0 of each page is the pass counter; words 1.. hold a fixed pattern
 * that depends on the page index, so a page that was never transferred, or
 * transferred from the wrong place, shows up. */
static inline unsigned ferry_guest_pattern(unsigned page, unsigned word) {
    return (page * 0x9E3779B1u) ^ (word * 0x85EBCA6Bu) ^ 0x5A5A5A5Au;
}

/* The disk writer (disk=<KiB/s>): 512-byte sector s of the region, written
 * in pass p, holds FERRY_DISK_MAGIC, s, p, then ferry_disk_pattern(s, p, w)
 * in words 3..127. The guest writes the region in order, pass after pass, so
 * the image holds pass p below the cursor and p - 1 (or zeros) above it. */
#define FERRY_DISK_MAGIC 0x31574446u /* "FDW1" */
#define FERRY_DISK_SECTOR 512u
#define FERRY_DISK_WORDS (FERRY_DISK_SECTOR / 4u)

static inline unsigned ferry_disk_pattern(unsigned lba, unsigned pass, unsigned word) {
    return (lba * 0x9E3779B1u) ^ (pass * 0xC2B2AE35u) ^ (word * 0x85EBCA6Bu);
}

#endif

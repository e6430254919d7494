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

#endif

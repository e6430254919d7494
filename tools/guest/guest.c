/*
 * ferry test guest: a freestanding 32-bit multiboot kernel.
 *
 * Kernel command line (key=value, space separated):
 *   ws=<MiB>      working set size (default 64)
 *   rate=<MiB/s>  how fast pages are dirtied; 0 = idle, max = as fast as possible (default 8)
 *   hb=<ms>       heartbeat interval (default 100)
 *   halt=1        after FERRY-READY, halt the vCPU for good: an idle VM
 *   stride=<n>    visit the pages in the order 0, n, 2n, ... (mod the page
 *                 count, which n must share no factor with): scattered
 *                 writes (default 1)
 *
 * Serial (COM1) output:
 *   FERRY-GUEST ws_base=0x1000000 ws_pages=<n> rate=<r> hb=<ms> tsc_khz=<k>
 *   FERRY-READY
 *   FERRY-HB <seq> <interval_ms> pass=<p>      every hb ms of guest time
 *
 * Memory: page i of the working set holds the pass counter in word 0 and a
 * fixed pattern in the rest. The guest sweeps the pages in order (0, s, 2s,
 * ... mod n with stride s, 0..n-1 by default) writing the current pass, so at
 * any instant word 0 is non-increasing in sweep order and spans at most two
 * consecutive values: that is what the host checks.
 */
#include "layout.h"

typedef unsigned int u32;
typedef unsigned long long u64;

static inline void outb(unsigned short port, unsigned char v) {
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}
static inline unsigned char inb(unsigned short port) {
    unsigned char v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

#define COM1 0x3F8

static void serial_init(void) {
    outb(COM1 + 1, 0x00); /* no interrupts */
    outb(COM1 + 3, 0x80); /* DLAB */
    outb(COM1 + 0, 0x01); /* 115200 */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); /* 8N1 */
    outb(COM1 + 2, 0xC7); /* FIFO */
}
static void putc_serial(char c) {
    while (!(inb(COM1 + 5) & 0x20))
        ;
    outb(COM1, (unsigned char)c);
}
static void puts_serial(const char* s) {
    while (*s)
        putc_serial(*s++);
}
static void put_u64(u64 v) {
    char buf[24];
    int i = 0;
    do {
        buf[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (i)
        putc_serial(buf[--i]);
}
static void put_hex(u32 v) {
    static const char digits[] = "0123456789abcdef";
    puts_serial("0x");
    int started = 0;
    for (int s = 28; s >= 0; s -= 4) {
        u32 d = (v >> s) & 0xF;
        if (d || started || s == 0) {
            putc_serial(digits[d]);
            started = 1;
        }
    }
}

/* Calibrates the TSC against PIT channel 2 over 50 ms; returns ticks per ms. */
static u64 tsc_per_ms(void) {
    const u32 ms = 50;
    const u32 count = 1193182u * ms / 1000u;
    outb(0x61, (unsigned char)((inb(0x61) & ~0x02) | 0x01)); /* gate on, speaker off */
    outb(0x43, 0xB0);                                         /* ch2, lo/hi, mode 0 */
    outb(0x42, (unsigned char)(count & 0xFF));
    outb(0x42, (unsigned char)(count >> 8));
    u64 t0 = rdtsc();
    while (!(inb(0x61) & 0x20))
        ;
    u64 t1 = rdtsc();
    u64 per = (t1 - t0) / ms;
    return per ? per : 1;
}

static int streq_prefix(const char* s, const char* prefix, const char** rest) {
    while (*prefix)
        if (*s++ != *prefix++)
            return 0;
    *rest = s;
    return 1;
}
static u32 parse_u32(const char* s) {
    u32 v = 0;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (u32)(*s++ - '0');
    return v;
}

struct multiboot_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline;
};

#define RATE_MAX 0xFFFFFFFFu

void guest_main(u32 magic, struct multiboot_info* mbi) {
    u32 ws_mib = 64, rate = 8, hb_ms = 100, halt = 0, stride = 1;
    serial_init();
    if (magic == 0x2BADB002u && (mbi->flags & 4) && mbi->cmdline) {
        const char* p = (const char*)mbi->cmdline;
        while (*p) {
            const char* v;
            if (streq_prefix(p, "ws=", &v))
                ws_mib = parse_u32(v);
            else if (streq_prefix(p, "rate=max", &v))
                rate = RATE_MAX;
            else if (streq_prefix(p, "rate=", &v))
                rate = parse_u32(v);
            else if (streq_prefix(p, "hb=", &v))
                hb_ms = parse_u32(v);
            else if (streq_prefix(p, "halt=", &v))
                halt = parse_u32(v);
            else if (streq_prefix(p, "stride=", &v))
                stride = parse_u32(v);
            while (*p && *p != ' ')
                ++p;
            while (*p == ' ')
                ++p;
        }
    }
    if (hb_ms == 0)
        hb_ms = 100;
    /* Keep the working set inside RAM: mem_upper is KiB above 1 MiB. */
    u32 mem_top_mib = (mbi->flags & 1) ? (mbi->mem_upper / 1024u + 1u) : 0;
    u32 base_mib = FERRY_GUEST_WS_BASE >> 20;
    if (mem_top_mib && ws_mib + base_mib > mem_top_mib) {
        puts_serial("FERRY-WARN working set clamped to fit RAM\n");
        ws_mib = mem_top_mib > base_mib ? mem_top_mib - base_mib : 0;
    }
    u32 pages = ws_mib * 256u;
    /* The sweep visits page (k * stride) mod pages: every page once a pass
     * when the stride and the page count have no common factor. */
    if (pages)
        stride %= pages;
    u32 a = pages, b = stride;
    while (b) {
        u32 t = a % b;
        a = b;
        b = t;
    }
    if (stride == 0 || a != 1) {
        if (stride != 1)
            puts_serial("FERRY-WARN stride does not visit every page once: using 1\n");
        stride = 1;
    }
    volatile u32* ws = (volatile u32*)FERRY_GUEST_WS_BASE;

    u64 per_ms = tsc_per_ms();
    puts_serial("FERRY-GUEST ws_base=");
    put_hex(FERRY_GUEST_WS_BASE);
    puts_serial(" ws_pages=");
    put_u64(pages);
    puts_serial(" rate=");
    if (rate == RATE_MAX)
        puts_serial("max");
    else
        put_u64(rate);
    puts_serial(" hb=");
    put_u64(hb_ms);
    puts_serial(" tsc_khz=");
    put_u64(per_ms);
    if (stride != 1) {
        puts_serial(" stride=");
        put_u64(stride);
    }
    putc_serial('\n');

    for (u32 pg = 0; pg < pages; ++pg) {
        volatile u32* w = ws + (u64)pg * FERRY_GUEST_WORDS;
        w[0] = 0;
        for (u32 i = 1; i < FERRY_GUEST_WORDS; ++i)
            w[i] = ferry_guest_pattern(pg, i);
    }
    puts_serial("FERRY-READY\n");
    if (halt) {
        /* An idle VM: no heartbeats, no dirtying, the vCPU halted for good
         * (interrupts off, so nothing wakes it) and using no host CPU. */
        for (;;)
            __asm__ volatile("cli; hlt");
    }

    u64 hb_ticks = per_ms * hb_ms;
    u64 start = rdtsc();
    u64 next_hb = start + hb_ticks;
    u64 seq = 0;
    u64 dirtied = 0; /* pages written since start (or since the last catch-up cap) */
    u64 dirty_start = start;
    u32 pass = 0, cursor = 0, page = 0; /* cursor: position in the sweep; page: the page it visits */
    /* pages per ms, in 1/1024ths to keep small rates exact enough */
    u64 pages_per_ms_x1024 = (rate == RATE_MAX) ? 0 : (u64)rate * 256u * 1024u / 1000u;

    for (;;) {
        u64 now = rdtsc();
        if (now >= next_hb) {
            puts_serial("FERRY-HB ");
            put_u64(++seq);
            putc_serial(' ');
            put_u64(hb_ms);
            puts_serial(" pass=");
            put_u64(pass);
            putc_serial('\n');
            next_hb += hb_ticks;
            if (next_hb < now) /* fell far behind: do not print a burst */
                next_hb = now + hb_ticks;
        }
        if (pages == 0 || rate == 0)
            continue;
        u64 due;
        if (rate == RATE_MAX) {
            due = dirtied + 256;
        } else {
            u64 elapsed_ms = (now - dirty_start) / per_ms;
            due = elapsed_ms * pages_per_ms_x1024 / 1024u;
            if (due > dirtied + pages_per_ms_x1024 * 2u / 1024u + 16u) {
                /* More than 2 ms behind: the vCPU did not run (paused,
                 * descheduled or throttled). The work of that time is lost,
                 * as a CPU-bound workload's would be: no catch-up burst, so
                 * the dirty rate follows the CPU time the guest gets. */
                dirty_start = now;
                dirtied = 0;
                continue;
            }
        }
        u32 batch = 0;
        while (dirtied < due && batch < 256) {
            if (cursor == 0)
                ++pass;
            ws[(u64)page * FERRY_GUEST_WORDS] = pass;
            page += stride;
            if (page >= pages)
                page -= pages;
            if (++cursor == pages)
                cursor = page = 0;
            ++dirtied;
            ++batch;
        }
    }
}

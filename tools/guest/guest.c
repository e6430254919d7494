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
 *   disk=<KiB/s>  write the first IDE disk (primary master, ATA PIO) at this
 *                 rate, sector after sector over a region, pass after pass,
 *                 reading back an older sector after each write (default 0: off)
 *   dsize=<MiB>   the region of the disk written (default 8; clamped to the disk)
 *   noise=<KiB/s> print filler lines at this rate, per second of CPU time
 *                 it gets (default 0: off): a guest whose console is busy
 *   nline=<bytes> the length of each filler line (default 100)
 *
 * Serial (COM1) output:
 *   FERRY-GUEST ws_base=0x1000000 ws_pages=<n> rate=<r> hb=<ms> tsc_khz=<k>
 *   FERRY-READY
 *   FERRY-HB <seq> <interval_ms> pass=<p>      every hb ms of guest time
 *   FERRY-DISK sectors=<n> rate=<KiB/s>           the disk writer's region
 *   FERRY-DISK-HB pass=<p> lba=<next> bad=<n>     with each heartbeat
 *   FERRY-DISK-BAD lba=<s> want=<p> got=<q>       a read-back that differs
 *   FERRY-NOISE abcd...                           filler, nline bytes a line
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

/* --- ATA PIO on the primary channel, master drive ------------------------- */

#define ATA_DATA 0x1F0
#define ATA_COUNT 0x1F2
#define ATA_LBA0 0x1F3
#define ATA_LBA1 0x1F4
#define ATA_LBA2 0x1F5
#define ATA_DRIVE 0x1F6
#define ATA_STATUS 0x1F7 /* read: status; write: command */
#define ATA_CTRL 0x3F6

static inline void outw(unsigned short port, unsigned short v) {
    __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port));
}
static inline unsigned short inw(unsigned short port) {
    unsigned short v;
    __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

/* Waits for BSY to clear, then for DRQ when asked; 0 on an error bit. */
static int ata_wait(int drq) {
    for (u32 i = 0; i < 100000000u; ++i) {
        unsigned char st = inb(ATA_STATUS);
        if (st == 0xFF)
            return 0; /* no drive */
        if (st & 0x80)
            continue;
        if (st & 0x21) /* ERR, DF */
            return 0;
        if (!drq || (st & 0x08))
            return 1;
    }
    return 0;
}

static int ata_command(u32 lba, u32 count, unsigned char cmd) {
    if (!ata_wait(0))
        return 0;
    outb(ATA_DRIVE, (unsigned char)(0xE0 | ((lba >> 24) & 0x0F)));
    outb(ATA_COUNT, (unsigned char)count);
    outb(ATA_LBA0, (unsigned char)lba);
    outb(ATA_LBA1, (unsigned char)(lba >> 8));
    outb(ATA_LBA2, (unsigned char)(lba >> 16));
    outb(ATA_STATUS, cmd);
    return 1;
}

/* Sectors of the drive (LBA28), 0 when there is none. */
static u32 ata_identify(void) {
    outb(ATA_CTRL, 0x02); /* no interrupts */
    if (inb(ATA_STATUS) == 0xFF)
        return 0;
    if (!ata_command(0, 0, 0xEC) || !ata_wait(1))
        return 0;
    u32 sectors = 0;
    for (u32 i = 0; i < 256; ++i) {
        unsigned short w = inw(ATA_DATA);
        if (i == 60)
            sectors |= w;
        if (i == 61)
            sectors |= (u32)w << 16;
    }
    return sectors;
}

static u32 disk_buf[8 * FERRY_DISK_WORDS];

static int ata_write(u32 lba, u32 count, u32 pass) {
    for (u32 s = 0; s < count; ++s) {
        u32* w = disk_buf + s * FERRY_DISK_WORDS;
        w[0] = FERRY_DISK_MAGIC;
        w[1] = lba + s;
        w[2] = pass;
        for (u32 i = 3; i < FERRY_DISK_WORDS; ++i)
            w[i] = ferry_disk_pattern(lba + s, pass, i);
    }
    if (!ata_command(lba, count, 0x30))
        return 0;
    for (u32 s = 0; s < count; ++s) {
        if (!ata_wait(1))
            return 0;
        unsigned short* h = (unsigned short*)(disk_buf + s * FERRY_DISK_WORDS);
        for (u32 i = 0; i < 256; ++i)
            outw(ATA_DATA, h[i]);
    }
    return ata_wait(0);
}

/* Reads one sector back; returns its pass, or 0xFFFFFFFF when it is not
 * what pass `want` wrote there (a zero sector reads as pass 0). */
static u32 ata_check(u32 lba, u32 want) {
    if (!ata_command(lba, 1, 0x20) || !ata_wait(1))
        return 0xFFFFFFFFu;
    unsigned short* h = (unsigned short*)disk_buf;
    for (u32 i = 0; i < 256; ++i)
        h[i] = inw(ATA_DATA);
    if (want == 0) {
        for (u32 i = 0; i < FERRY_DISK_WORDS; ++i)
            if (disk_buf[i])
                return disk_buf[2];
        return 0;
    }
    if (disk_buf[0] != FERRY_DISK_MAGIC || disk_buf[1] != lba)
        return 0xFFFFFFFFu;
    for (u32 i = 3; i < FERRY_DISK_WORDS; ++i)
        if (disk_buf[i] != ferry_disk_pattern(lba, disk_buf[2], i))
            return 0xFFFFFFFFu;
    return disk_buf[2];
}

struct disk_writer {
    u64 start, done, bad;
    u32 pass, lba; /* the next block to write */
};

/* Writes the next 4 KiB block, then reads back the sector half a region
 * behind: written in this pass below the cursor, in the last one above it. */
static void disk_step(struct disk_writer* d, u32 sectors) {
    if (!ata_write(d->lba, 8, d->pass)) {
        puts_serial("FERRY-DISK-BAD write failed lba=");
        put_u64(d->lba);
        putc_serial('\n');
        ++d->bad;
    }
    d->lba += 8;
    if (d->lba >= sectors) {
        d->lba = 0;
        ++d->pass;
    }
    ++d->done;
    u32 check = d->lba + sectors / 2;
    if (check >= sectors)
        check -= sectors;
    u32 want = check < d->lba ? d->pass : d->pass - 1;
    u32 got = ata_check(check, want);
    if (got != want) {
        puts_serial("FERRY-DISK-BAD lba=");
        put_u64(check);
        puts_serial(" want=");
        put_u64(want);
        puts_serial(" got=");
        put_u64(got);
        putc_serial('\n');
        ++d->bad;
    }
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
    u32 ws_mib = 64, rate = 8, hb_ms = 100, halt = 0, stride = 1, disk_kib = 0, dsize_mib = 8;
    u32 noise_kib = 0, nline = 100;
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
            else if (streq_prefix(p, "disk=", &v))
                disk_kib = parse_u32(v);
            else if (streq_prefix(p, "dsize=", &v))
                dsize_mib = parse_u32(v);
            else if (streq_prefix(p, "noise=", &v))
                noise_kib = parse_u32(v);
            else if (streq_prefix(p, "nline=", &v))
                nline = parse_u32(v);
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
    /* The disk writer's region, in whole 4 KiB blocks. */
    u32 disk_sectors = 0;
    if (disk_kib) {
        u32 have = ata_identify();
        disk_sectors = dsize_mib * 2048u;
        if (disk_sectors > have)
            disk_sectors = have;
        disk_sectors &= ~7u;
        if (!disk_sectors)
            puts_serial("FERRY-WARN disk=: no IDE disk on the primary channel\n");
        puts_serial("FERRY-DISK sectors=");
        put_u64(disk_sectors);
        puts_serial(" rate=");
        put_u64(disk_kib);
        putc_serial('\n');
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
    /* The disk writer: 4 KiB blocks due by guest time, no catch-up. */
    struct disk_writer disk = {start, 0, 0, 1, 0};
    /* The console filler: whole lines due by guest time, no catch-up. */
    u64 noise_start = start, noise_done = 0;
    if (nline < 13)
        nline = 13;

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
            if (disk_sectors) {
                puts_serial("FERRY-DISK-HB pass=");
                put_u64(disk.pass);
                puts_serial(" lba=");
                put_u64(disk.lba);
                puts_serial(" bad=");
                put_u64(disk.bad);
                putc_serial('\n');
            }
        }
        if (disk_sectors) {
            u64 due = (now - disk.start) / per_ms * disk_kib / 4000u; /* 4 KiB blocks */
            if (due > disk.done + disk_kib / 2000u + 16u) { /* the vCPU did not run: no burst */
                disk.start = now;
                disk.done = 0;
            }
            for (u32 b = 0; b < 16 && disk.done < due; ++b)
                disk_step(&disk, disk_sectors);
        }
        if (noise_kib) {
            u64 due_bytes = (now - noise_start) / per_ms * noise_kib * 1024u / 1000u;
            if (due_bytes > noise_done + (u64)noise_kib * 1024u / 100u + nline) { /* did not run: no burst */
                noise_start = now;
                noise_done = 0;
            } else if (noise_done + nline <= due_bytes) {
                puts_serial("FERRY-NOISE ");
                for (u32 i = 12; i + 1 < nline; ++i)
                    putc_serial((char)('a' + (i - 12) % 26));
                putc_serial('\n');
                noise_done += nline;
            }
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

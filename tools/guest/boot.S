/* Multiboot (v1) entry for the ferry test guest. */
    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0x00000003        /* page-align modules, want memory info */
    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .section .text
    .globl _start
_start:
    cli
    mov $stack_top, %esp
    push %ebx                         /* multiboot info */
    push %eax                         /* multiboot magic */
    call guest_main
1:  hlt
    jmp 1b

    .section .bss
    .align 16
    .skip 65536
stack_top:
    .section .note.GNU-stack, "", @progbits

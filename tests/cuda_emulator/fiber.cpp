// The emulator's stack switch on x86-64 (see emulator.h): pushes the callee-saved registers and the SSE/x87
// control words, stores the stack pointer in *save_sp (rdi), switches to load_sp (rsi) and pops the same
// frame there. Everything else a call may clobber, the C++ caller already assumes clobbered.
#include "emulator.h"  // CUDA_EMULATOR_ASM_SWITCH

#if defined(CUDA_EMULATOR_ASM_SWITCH)
asm(R"(
    .pushsection .text
    .globl cuda_emulator_switch
    .hidden cuda_emulator_switch
    .type cuda_emulator_switch, @function
cuda_emulator_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuda_emulator_switch, .-cuda_emulator_switch
    .popsection
)");
#endif

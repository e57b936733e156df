// The Python module metal_marlin_torch._C: importing it runs the static op registrations
// of register.mm. It has no Python-visible functions of its own.
#include <Python.h>

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }

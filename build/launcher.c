/*
 * The bundle's executable (dist/aws-vpc-cni/aws-vpc-cni), in place of PyInstaller's bootloader.
 *
 * Every pod ADD and DEL execs three to four of our programs, so what an exec costs before our code
 * runs is paid 3-4 times per pod operation. PyInstaller's onedir bootloader on Linux starts, reads
 * its archive, sets LD_LIBRARY_PATH and execs itself again (unconditionally: glibc reads that
 * variable only at start-up), then loads libpython, runs its bootstrap modules (which import
 * ctypes on every start) and its run-time hooks. This launcher does only what our programs need:
 * one process, the bundled libpython linked in, the interpreter configured as PyInstaller
 * configures it, and build/entry.py run. Bundled shared libraries are found without
 * LD_LIBRARY_PATH: this executable carries DT_RPATH $ORIGIN/_internal, and build.sh points the
 * RUNPATH of every bundled library and extension module into the bundle (build/elfpaths.py).
 * Measured (aws-eni-ipam VERSION, CPU per exec): ~29 -> ~19 ms; see the commit messages of build/.
 *
 * What our code sees is what PyInstaller gave it: the same sys.path (the bundle's folder and its
 * lib-dynload; nothing from the environment), sys.executable (this file, symlinks resolved),
 * sys.prefix (_internal), sys.frozen and sys._MEIPASS, isolated mode without site, no bytecode
 * writing, Python's signal handlers, UTF-8 mode under the C/POSIX locale, LC_CTYPE from the
 * environment. It differs in that child processes get no LD_LIBRARY_PATH (nor _PYI_* variables),
 * so an iptables-save run by a plugin loads the host's libraries, not the bundle's.
 *
 * A plugin first asks the plugins' resident helper, when one serves (build/zygote.py: an interpreter
 * with every plugin loaded, which the node agent starts), to run it in a forked child in this
 * process's place; only when none is there, or it refuses, does this launcher start Python itself.
 *
 * Built by build/build.sh with -DLIB_DYNLOAD="python3.X/lib-dynload" -DOPTIMIZE=<level>.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef LIB_DYNLOAD
#error "build with -DLIB_DYNLOAD=\"python3.X/lib-dynload\" (the bundle's extension module folder)"
#endif
#ifndef OPTIMIZE
#define OPTIMIZE 0
#endif

/* Run in __main__ once the interpreter is up: build/entry.py (_internal/entry.pyc), which first
 * gives Python 3.11's frozen stdlib modules their __file__ as PyInstaller's bootstrap does. */
#define RUN "import entry\nentry.main()\n"

/* The zygote's socket: this variable, or the agent's default data folder; empty = never ask. */
#define ZYGOTE_SOCKET_ENV "AWS_VPC_CNI_ZYGOTE_SOCKET"
#define ZYGOTE_SOCKET_DEFAULT "/var/run/aws-vpc-cni/zygote.sock"
#define ZYGOTE_TIMEOUT_S 2 /* to connect and hear yes or no; none once the plugin runs */

static const char *const PLUGINS[] = {"aws-eni-ipam", "aws-vpc-bridge", "aws-snat", "portmap-compat", NULL};

extern char **environ;

/* build/zygote.py's HEADER ("=4sI"), field for field. What the zygote must know of this process
 * (its executable, namespaces, capabilities, umask) it reads from the kernel, not from here. */
struct __attribute__((packed)) zygote_request {
    char magic[4];
    uint32_t payload_length;
};

static const char *plugin_name(int argc, char **argv)
{
    const char *base = strrchr(argv[0], '/') ? strrchr(argv[0], '/') + 1 : argv[0];
    if (strcmp(base, "aws-vpc-cni") == 0 && argc > 1)
        base = argv[1];
    for (const char *const *p = PLUGINS; *p; p++)
        if (strcmp(base, *p) == 0)
            return *p;
    return NULL;
}

static int send_all(int sock, const char *data, size_t len)
{
    while (len > 0) {
        ssize_t n = send(sock, data, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

static int recv_all(int sock, void *buf, size_t len)
{
    char *p = buf;
    while (len > 0) {
        ssize_t n = recv(sock, p, len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* The request: header and payload (program, exe, environment) sent with our fds 0-2, root and netns. */
static int send_request(int sock, const char *program, const char *exe)
{
    struct zygote_request req;
    size_t length = strlen(program) + 1 + strlen(exe) + 1, off = 0;
    char *payload, **e;
    int fds[5] = {0, 1, 2, -1, -1}, rc = -1;

    for (e = environ; *e; e++)
        length += strlen(*e) + 1;
    if (length > (1u << 20) || (payload = malloc(length)) == NULL)
        return -1;
    off += (size_t)sprintf(payload, "%s", program) + 1;
    off += (size_t)sprintf(payload + off, "%s", exe) + 1;
    for (e = environ; *e; e++)
        off += (size_t)sprintf(payload + off, "%s", *e) + 1;

    memcpy(req.magic, "AVZ2", 4);
    req.payload_length = (uint32_t)length;

    fds[3] = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    fds[4] = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    if (fds[3] >= 0 && fds[4] >= 0) {
        union {
            char buf[CMSG_SPACE(sizeof fds)];
            struct cmsghdr align;
        } control;
        struct iovec iov = {&req, sizeof req};
        struct msghdr msg = {0};
        struct cmsghdr *cmsg;
        ssize_t n;

        memset(&control, 0, sizeof control);
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof control.buf;
        cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof fds);
        memcpy(CMSG_DATA(cmsg), fds, sizeof fds);
        do
            n = sendmsg(sock, &msg, MSG_NOSIGNAL);
        while (n < 0 && errno == EINTR);
        if (n >= 0 && send_all(sock, (char *)&req + n, sizeof req - (size_t)n) == 0 &&
            send_all(sock, payload, length) == 0)
            rc = 0;
    }
    if (fds[3] >= 0)
        close(fds[3]);
    if (fds[4] >= 0)
        close(fds[4]);
    free(payload);
    return rc;
}

/* Run the plugin in the zygote: its exit code, or -1 when this process must start Python itself
 * (no zygote, refused, or gone before the plugin started). Once the zygote's child has been told to
 * go, the plugin runs there only: a lost answer is an error, never a second run. */
static int run_in_zygote(const char *program, const char *exe)
{
    const char *path = getenv(ZYGOTE_SOCKET_ENV);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    struct timeval timeout = {ZYGOTE_TIMEOUT_S, 0}, none = {0, 0};
    char answer = 0;
    int32_t code;
    int sock, fd;

    if (path == NULL)
        path = ZYGOTE_SOCKET_DEFAULT;
    if (*path == 0 || strlen(path) >= sizeof addr.sun_path || getenv("CNI_COMMAND") == NULL)
        return -1;
    for (fd = 0; fd <= 2; fd++)
        if (fcntl(fd, F_GETFD) < 0)
            return -1;
    strcpy(addr.sun_path, path);
    sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return -1;
    if (setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout) < 0 ||
        setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout) < 0 ||
        connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0 || send_request(sock, program, exe) < 0 ||
        recv_all(sock, &answer, 1) < 0 || answer != 'A' || send_all(sock, "G", 1) < 0) {
        close(sock);
        return -1;
    }
    if (setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof none) < 0 || recv_all(sock, &code, sizeof code) < 0) {
        fprintf(stderr, "%s: the plugin's run in aws-vpc-cni-zygote ended without an exit status (killed?)\n", program);
        return 1;
    }
    close(sock);
    return code & 0xff;
}

static int fail(const char *what)
{
    fprintf(stderr, "aws-vpc-cni bundle: %s\n", what);
    return 127;
}

static int add_path(PyConfig *config, const char *dir, const char *sub)
{
    char path[PATH_MAX];
    wchar_t *wide;
    PyStatus status;

    if (snprintf(path, sizeof path, "%s%s%s", dir, *sub ? "/" : "", sub) >= (int)sizeof path)
        return -1;
    wide = Py_DecodeLocale(path, NULL);
    if (wide == NULL)
        return -1;
    status = PyWideStringList_Append(&config->module_search_paths, wide);
    PyMem_RawFree(wide);
    return PyStatus_Exception(status) ? -1 : 0;
}

int main(int argc, char **argv)
{
    char exe[PATH_MAX], home[PATH_MAX];
    ssize_t len;
    char *slash;
    PyPreConfig preconfig;
    PyConfig config;
    PyStatus status;
    PyObject *meipass;
    const char *program;
    int code;

    /* The bundle's folder, from the executable itself: argv[0] is a link in /opt/cni/bin. */
    len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len <= 0)
        return fail("cannot read /proc/self/exe");
    exe[len] = 0;
    slash = strrchr(exe, '/');
    if (slash == NULL || snprintf(home, sizeof home, "%.*s/_internal", (int)(slash - exe), exe) >= (int)sizeof home)
        return fail("the executable's path is too long");

    if ((program = plugin_name(argc, argv)) != NULL && (code = run_in_zygote(program, exe)) >= 0)
        return code;

    /* As PyInstaller 6's bootloader: isolated, LC_CTYPE from the environment, UTF-8 mode if that is
     * the C or POSIX locale. */
    PyPreConfig_InitIsolatedConfig(&preconfig);
    preconfig.utf8_mode = -1;
    preconfig.configure_locale = 1;
    status = Py_PreInitialize(&preconfig);
    if (PyStatus_Exception(status))
        Py_ExitStatusException(status);

    PyConfig_InitIsolatedConfig(&config);
    config.site_import = 0;
    config.write_bytecode = 0;
    config.configure_c_stdio = 1;
    config.buffered_stdio = 1;
    config.install_signal_handlers = 1;
    config.optimization_level = OPTIMIZE;
    config.parse_argv = 0;
    status = PyConfig_SetBytesString(&config, &config.program_name, exe);
    if (!PyStatus_Exception(status))
        status = PyConfig_SetBytesString(&config, &config.executable, exe);
    if (!PyStatus_Exception(status))
        status = PyConfig_SetBytesString(&config, &config.home, home);
    if (!PyStatus_Exception(status))
        status = PyConfig_SetBytesArgv(&config, argc, argv);
    if (!PyStatus_Exception(status))
        status = PyConfig_SetString(&config, &config.run_command, L"" RUN);
    if (PyStatus_Exception(status))
        goto config_error;
    config.module_search_paths_set = 1;
    if (add_path(&config, home, LIB_DYNLOAD) < 0 || add_path(&config, home, "") < 0) {
        PyConfig_Clear(&config);
        return fail("cannot set the module search path");
    }

    status = Py_InitializeFromConfig(&config);
    if (PyStatus_Exception(status))
        goto config_error;
    PyConfig_Clear(&config);

    /* What PyInstaller's bootstrap sets, for any code that asks. */
    meipass = PyUnicode_DecodeFSDefault(home);
    if (meipass == NULL || PySys_SetObject("_MEIPASS", meipass) < 0 || PySys_SetObject("frozen", Py_True) < 0) {
        PyErr_Print();
        return fail("cannot set sys._MEIPASS and sys.frozen");
    }
    Py_DECREF(meipass);
    return Py_RunMain();

config_error:
    PyConfig_Clear(&config);
    Py_ExitStatusException(status);
}

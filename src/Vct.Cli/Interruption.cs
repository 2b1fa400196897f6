using System.Runtime.InteropServices;

namespace Vct.Cli;

/// <summary>
/// Ctrl-C and SIGTERM (kill, docker stop, a scheduler's pre-emption) for the long commands: the first signal cancels
/// <see cref="Token"/> (the work stops after its current batch or step and keeps what it wrote); a second Ctrl-C
/// aborts at once with exit code 130. Disposing removes both handlers.
/// </summary>
internal sealed class Interruption : IDisposable
{
    private readonly CancellationTokenSource _cts = new();
    private readonly ConsoleCancelEventHandler _onCancel;
    private readonly PosixSignalRegistration _onTerm;

    /// <param name="stopping">Printed on the first Ctrl-C.</param>
    /// <param name="aborting">Printed on a second signal that aborts.</param>
    /// <param name="terminating">Printed on the first SIGTERM (null: nothing).</param>
    /// <param name="terminateAgainAborts">Whether a second SIGTERM aborts like a second Ctrl-C.</param>
    /// <param name="onTerminate">Called on every SIGTERM before the token is cancelled.</param>
    public Interruption(string stopping, string aborting, string? terminating, bool terminateAgainAborts, Action? onTerminate = null)
    {
        void Abort()
        {
            Console.Error.WriteLine(aborting);
            VctRuntime.PrepareForExit(); // running work holds the finalizer gate; exit would wait for it
            Environment.Exit(130);
        }
        _onCancel = (_, e) =>
        {
            e.Cancel = true;
            if (_cts.IsCancellationRequested) Abort();
            Console.Error.WriteLine(stopping);
            _cts.Cancel();
        };
        Console.CancelKeyPress += _onCancel;
        _onTerm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, ctx =>
        {
            ctx.Cancel = true;
            Terminated = true;
            onTerminate?.Invoke();
            if (_cts.IsCancellationRequested)
            {
                if (terminateAgainAborts) Abort();
                return;
            }
            if (terminating is not null) Console.Error.WriteLine(terminating);
            _cts.Cancel();
        });
    }

    /// <summary>Cancelled by the first signal.</summary>
    public CancellationToken Token => _cts.Token;

    /// <summary>True once a SIGTERM arrived.</summary>
    public bool Terminated { get; private set; }

    /// <summary>Removes the Ctrl-C handler (SIGTERM stays handled until <see cref="Dispose"/>).</summary>
    public void StopHandlingCtrlC() => Console.CancelKeyPress -= _onCancel;

    public void Dispose()
    {
        StopHandlingCtrlC();
        _onTerm.Dispose();
        _cts.Dispose();
    }
}
